//! JSON access logs: one line per request, written by a thread of their own so a slow
//! disk never stalls a worker. A full buffer drops lines (with a warning) rather than wait.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Lines buffered between the workers and the writer thread.
const BUFFER: usize = 16 * 1024;

pub struct AccessLog {
    target: String,
    lines: SyncSender<String>,
    warned: AtomicBool,
}

impl AccessLog {
    /// `target` is `stderr` or a file path (appended to, created if missing).
    pub fn open(target: &str) -> Result<Self, String> {
        let mut out: Box<dyn Write + Send> = if target == "stderr" {
            Box::new(std::io::stderr())
        } else {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(target)
                .map_err(|e| format!("cannot open {target}: {e}"))?;
            Box::new(std::io::BufWriter::new(file))
        };
        let (lines, receive) = sync_channel::<String>(BUFFER);
        std::thread::Builder::new()
            .name("meshpy-access-log".into())
            .spawn(move || {
                // Ends when the listener's last snapshot is gone and the channel closes.
                while let Ok(line) = receive.recv() {
                    let _ = writeln!(out, "{line}");
                    while let Ok(more) = receive.try_recv() {
                        let _ = writeln!(out, "{more}");
                    }
                    let _ = out.flush();
                }
            })
            .map_err(|e| format!("cannot start the access log writer: {e}"))?;
        Ok(Self { target: target.to_owned(), lines, warned: AtomicBool::new(false) })
    }

    pub fn write(&self, entry: &Entry) {
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) =
            self.lines.try_send(entry.to_json())
        {
            if !self.warned.swap(true, Relaxed) {
                tracing::warn!(target = %self.target, "access log lines dropped: the writer cannot keep up");
            }
        }
    }
}

/// What one access log line says about a request.
#[derive(Default)]
pub struct Entry {
    pub listener: String,
    pub method: String,
    pub authority: String,
    pub path: String,
    pub client: String,
    pub identity: Option<String>,
    pub request_id: Option<String>,
    pub route: Option<String>,
    pub cluster: Option<String>,
    pub status: u16,
    pub duration: Duration,
}

impl Entry {
    fn to_json(&self) -> String {
        let time = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64();
        serde_json::json!({
            "time": time,
            "listener": self.listener,
            "method": self.method,
            "authority": self.authority,
            "path": self.path,
            "status": self.status,
            "duration_ms": self.duration.as_secs_f64() * 1000.0,
            "route": self.route,
            "cluster": self.cluster,
            "client": self.client,
            "identity": self.identity,
            "request_id": self.request_id,
        })
        .to_string()
    }
}
