//! The running proxy: its runtime, its listeners, and config reloads.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::runtime::Handle;
use tokio::sync::watch;

use crate::config::Config;
use crate::drain::Drain;
use crate::filter::{ChainHandle, FilterRunner};
use crate::listener::accept_loop;
use crate::metrics::Registry;
use crate::snapshot::{Kind, Snapshot};
use crate::Error;

/// State shared by every task of the proxy.
pub struct Shared {
    pub snapshot: ArcSwap<Snapshot>,
    /// Runs the Python filters of the routes that have them.
    pub filters: Arc<dyn FilterRunner>,
    pub registry: Registry,
    pub drain: Arc<Drain>,
    /// Bound address of each accept loop, by listener key.
    bound: Mutex<HashMap<String, SocketAddr>>,
}

impl Shared {
    /// Listener name to bound address, as the active snapshot names them.
    pub fn addresses(&self) -> BTreeMap<String, String> {
        let snapshot = self.snapshot.load();
        let bound = self.bound.lock().unwrap();
        snapshot
            .listeners
            .iter()
            .filter_map(|(key, l)| bound.get(key).map(|addr| (l.name.clone(), addr.to_string())))
            .collect()
    }
}

struct AcceptLoop {
    stop: watch::Sender<bool>,
}

/// One data-plane thread running its own single-threaded runtime. Connections stay
/// on the thread that accepted them: no work stealing, no cross-thread wakeups.
struct Worker {
    handle: Handle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Worker {
    fn spawn(index: usize) -> Result<Self, Error> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Error::Listen(format!("cannot start a worker runtime: {e}")))?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(format!("meshpy-worker-{index}"))
            .spawn(move || {
                crate::pool::set_worker(index);
                let _ = runtime.block_on(async {
                    crate::filter::Mailbox::install();
                    stopped.await
                });
                runtime.shutdown_timeout(Duration::from_millis(100));
            })
            .map_err(|e| Error::Listen(format!("cannot start a worker thread: {e}")))?;
        Ok(Self { handle, stop: Some(stop), thread: Some(thread) })
    }

    fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

pub struct Proxy {
    /// Emptied by shutdown.
    workers: Mutex<Vec<Worker>>,
    /// Runs control work (binding, draining) on the first worker.
    handle: Handle,
    shared: Arc<Shared>,
    loops: Mutex<HashMap<String, AcceptLoop>>,
    /// Serializes reloads so versions are assigned and applied in order.
    reload_lock: Mutex<()>,
}

impl Proxy {
    /// Starts `workers` data-plane threads, binds every listener and starts serving.
    /// Returns once all sockets are bound. `chains` are the filter runner's objects for
    /// the filter chains the config names.
    pub fn start(
        config: Config,
        workers: usize,
        filters: Arc<dyn FilterRunner>,
        chains: &HashMap<u64, ChainHandle>,
    ) -> Result<Self, Error> {
        let workers = (0..workers.max(1)).map(Worker::spawn).collect::<Result<Vec<_>, _>>()?;
        let handle = workers[0].handle.clone();
        let registry = Registry::default();
        let snapshot = {
            let _entered = handle.enter();
            Snapshot::build(config, 1, None, &registry, chains)?
        };
        let shared = Arc::new(Shared {
            snapshot: ArcSwap::from_pointee(empty_snapshot()),
            filters,
            registry,
            drain: Drain::new(),
            bound: Mutex::new(HashMap::new()),
        });
        let proxy = Self {
            handle,
            workers: Mutex::new(workers),
            shared,
            loops: Mutex::new(HashMap::new()),
            reload_lock: Mutex::new(()),
        };
        proxy.apply(snapshot)?;
        Ok(proxy)
    }

    /// Validates and swaps in a new config. On any error the old config stays.
    pub fn reload(&self, config: Config, chains: &HashMap<u64, ChainHandle>) -> Result<u64, Error> {
        let _serial = self.reload_lock.lock().unwrap();
        if !self.is_running() {
            return Err(Error::Config("the proxy has shut down".into()));
        }
        let current = self.shared.snapshot.load_full();
        let built = {
            let _entered = self.handle.enter();
            Snapshot::build(config, current.version + 1, Some(&current), &self.shared.registry, chains)
        };
        let result = built.and_then(|snapshot| self.apply(snapshot));
        match &result {
            Ok(version) => {
                self.shared.registry.reloads_ok.fetch_add(1, Relaxed);
                tracing::info!(version, "config applied");
            }
            Err(e) => {
                self.shared.registry.reloads_failed.fetch_add(1, Relaxed);
                tracing::error!(error = %e, "config refused; keeping version {}", current.version);
            }
        }
        result
    }

    /// Binds the listeners the snapshot adds, swaps it in, then stops the accept
    /// loops it no longer has. Binding comes first so a failure changes nothing.
    fn apply(&self, snapshot: Snapshot) -> Result<u64, Error> {
        let mut loops = self.loops.lock().unwrap();
        let mut fresh = Vec::new();
        for (key, listener) in &snapshot.listeners {
            if loops.contains_key(key) {
                continue;
            }
            let socket = bind(&listener.listen).map_err(|e| {
                Error::Listen(format!(
                    "listener \"{}\": cannot listen on {}: {e}",
                    listener.name, listener.listen
                ))
            })?;
            fresh.push((key.clone(), socket));
        }
        let version = snapshot.version;
        let keep: Vec<String> = snapshot.listeners.keys().cloned().collect();
        self.shared.registry.config_version.store(version, Relaxed);
        self.shared.snapshot.store(Arc::new(snapshot));
        let mut bound = self.shared.bound.lock().unwrap();
        for (key, socket) in fresh {
            if let Ok(addr) = socket.local_addr() {
                bound.insert(key.clone(), addr);
            }
            // Every worker accepts on the same socket; whichever wakes first serves.
            let (stop, stopped) = watch::channel(false);
            let key: Arc<str> = key.into();
            for worker in self.workers.lock().unwrap().iter() {
                let Ok(socket) = socket.try_clone() else { continue };
                let (key, shared, stopped) = (key.clone(), self.shared.clone(), stopped.clone());
                worker.handle.spawn(async move {
                    match TcpListener::from_std(socket) {
                        Ok(socket) => accept_loop(socket, key, shared, stopped).await,
                        Err(e) => tracing::error!(listener = %key, error = %e, "cannot register listener"),
                    }
                });
            }
            loops.insert(key.to_string(), AcceptLoop { stop });
        }
        loops.retain(|key, accept| {
            let kept = keep.contains(key);
            if !kept {
                accept.stop.send_replace(true);
                bound.remove(key);
            }
            kept
        });
        Ok(version)
    }

    /// Counts a reload refused before it reached the core (bad YAML, failed
    /// validation; the caller logs why), so the reload metrics tell the whole story.
    pub fn record_reload_failure(&self) {
        self.shared.registry.reloads_failed.fetch_add(1, Relaxed);
    }

    pub fn version(&self) -> u64 {
        self.shared.snapshot.load().version
    }

    pub fn addresses(&self) -> BTreeMap<String, String> {
        self.shared.addresses()
    }

    pub fn is_running(&self) -> bool {
        !self.workers.lock().unwrap().is_empty()
    }

    /// Stops accepting, lets open connections finish up to `deadline`, then stops
    /// the runtime. Blocks the calling thread.
    pub fn shutdown(&self, deadline: Duration) {
        let mut workers = std::mem::take(&mut *self.workers.lock().unwrap());
        if workers.is_empty() {
            return;
        }
        // The admin listener keeps answering while traffic drains, so probes see
        // `/ready` turn 503 instead of a refused connection.
        let snapshot = self.shared.snapshot.load_full();
        let is_admin =
            |key: &String| snapshot.listeners.get(key).is_some_and(|l| matches!(l.kind, Kind::Admin));
        let mut loops = std::mem::take(&mut *self.loops.lock().unwrap());
        loops.retain(|key, accept| {
            if is_admin(key) {
                return true;
            }
            accept.stop.send_replace(true);
            false
        });
        let left = self.handle.block_on(self.shared.drain.drain(deadline));
        if left > 0 {
            tracing::warn!(connections = left, "drain deadline reached; closing remaining connections");
        }
        for accept in loops.values() {
            accept.stop.send_replace(true);
        }
        for worker in &mut workers {
            worker.stop();
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shutdown(Duration::ZERO);
    }
}

fn empty_snapshot() -> Snapshot {
    Snapshot {
        version: 0,
        config: Config { admin: None, identity: None, listeners: vec![], clusters: vec![] },
        listeners: HashMap::new(),
        clusters: HashMap::new(),
    }
}

/// Binds a listening socket the way servers should: address reuse for quick
/// restarts (not port sharing), non-blocking, a deep accept backlog.
fn bind(listen: &str) -> std::io::Result<std::net::TcpListener> {
    let addr: SocketAddr = listen
        .parse()
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "expected ip:port"))?;
    let socket = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    Ok(socket.into())
}
