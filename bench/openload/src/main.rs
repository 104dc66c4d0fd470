//! Constant-rate HTTP/1.1 load for the fixed-rate runs of `python -m bench`
//! (`--latency-load open`).
//!
//! Requests fall due at evenly spaced times, `1/rate` apart, whatever the server does,
//! and a due request goes out on the first of `--connections` keep-alive connections
//! that is free. A periodic timerfd wakes the one thread at each due time: tokio's own
//! timers tick in milliseconds, which would send the requests of a millisecond together.
//! Each latency runs from when its request fell due, not from when it was written, so
//! the wait of a request that found every connection busy, or a wake-up that came late,
//! is counted (no coordinated omission); how late requests went out is reported beside
//! the latencies, so a generator that fell behind shows.
//!
//! The requests due during `--duration` after `--warmup` are measured: each is written
//! to `--log-file` as h2load writes its log (`<start µs since the epoch>\t<status>\t<µs
//! until the response ended>`, status -1 for a request that got no response), and one
//! JSON object of counts is printed.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::io::{self, Write as _};
use std::net::{SocketAddr, ToSocketAddrs};
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::rc::Rc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::sys::time::TimeSpec;
use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;

const USAGE: &str = "usage: meshpy-openload --url http://HOST:PORT/PATH --rate REQ_PER_S \
--log-file PATH [--connections N (default 50)] [--duration S (default 10)] [--warmup S (default 2)] \
[-H|--header 'Name: value']... [--timeout S (default 5)]";

/// Time between starting the clock and the first request, for the tasks to settle.
const LEAD: Duration = Duration::from_millis(20);
const MAX_RESPONSE_HEADERS: usize = 64;

struct Args {
    address: SocketAddr,
    request: Vec<u8>,
    rate: f64,
    connections: usize,
    duration: f64,
    warmup: f64,
    /// How long the requests still out when the last one fell due may take.
    timeout: f64,
    log_file: String,
}

fn parse_args() -> Result<Args, String> {
    let mut args = std::env::args().skip(1);
    let (mut url, mut rate, mut log_file, mut headers) = (None, None, None, Vec::new());
    let (mut connections, mut duration, mut warmup, mut timeout) = (50, 10.0, 2.0, 5.0);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or(format!("{flag} needs a value"))?;
        let bad = |e: &dyn std::fmt::Display| format!("{flag} {value}: {e}");
        match flag.as_str() {
            "--url" => url = Some(value),
            "--rate" => rate = Some(value.parse::<f64>().map_err(|e| bad(&e))?),
            "--log-file" => log_file = Some(value),
            "--connections" => connections = value.parse().map_err(|e| bad(&e))?,
            "--duration" => duration = value.parse().map_err(|e| bad(&e))?,
            "--warmup" => warmup = value.parse().map_err(|e| bad(&e))?,
            "--timeout" => timeout = value.parse().map_err(|e| bad(&e))?,
            // `-H` as wrk and h2load spell it, so the bench hands all three the same options.
            "--header" | "-H" => {
                let (name, field) = value.split_once(':').ok_or_else(|| bad(&"expected 'Name: value'"))?;
                headers.push(format!("{}: {}", name.trim(), field.trim()));
            }
            _ => return Err(format!("unknown option {flag}")),
        }
    }
    let url = url.ok_or("--url is required")?;
    // The timer's interval is whole nanoseconds, and one thread sends every request.
    if rate.is_some_and(|rate| rate > 1e6) {
        return Err("--rate above 1000000 requests/s is more than one client thread sends".into());
    }
    let rate = rate.ok_or("--rate is required")?;
    if !(rate > 0.0 && duration > 0.0 && warmup >= 0.0 && timeout >= 0.0) || connections == 0 {
        return Err(
            "--rate, --duration and --connections must be positive, --warmup and --timeout not negative"
                .into(),
        );
    }
    let rest = url.strip_prefix("http://").ok_or(format!("--url {url}: only http:// URLs are supported"))?;
    let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let address = host
        .to_socket_addrs()
        .map_err(|e| format!("--url {url}: {e}"))?
        .next()
        .ok_or(format!("--url {url}: {host} has no address"))?;
    let path = if path.is_empty() { "/" } else { path };
    let mut request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n");
    for header in headers {
        request.push_str(&header);
        request.push_str("\r\n");
    }
    request.push_str("\r\n");
    Ok(Args {
        address,
        request: request.into_bytes(),
        rate,
        connections,
        duration,
        warmup,
        timeout,
        log_file: log_file.ok_or("--log-file is required")?,
    })
}

/// A timerfd as tokio's reactor can watch it.
struct Ticks(TimerFd);

impl AsRawFd for Ticks {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

/// One measured request.
struct Sample {
    due: Instant,
    /// How long after falling due it was written.
    delay: Duration,
    /// `None`: no response (the error is counted).
    status: Option<u16>,
    latency: Duration,
}

/// What the dispatcher and the connections share, on the one thread.
struct Shared {
    due: RefCell<VecDeque<Instant>>,
    ready: Notify,
    /// Set once the last request has fallen due.
    dispatched: Cell<bool>,
    /// Due times of the measured requests: from this instant ...
    measure_from: Instant,
    /// ... up to (not including) this one.
    measure_until: Instant,
    samples: RefCell<Vec<Sample>>,
    /// How many requests fell due in the measured span.
    measured: Cell<u64>,
    first_error: RefCell<Option<String>>,
}

impl Shared {
    /// The next request due, once one is; `None` when none will be.
    async fn next_due(&self) -> Option<Instant> {
        loop {
            if let Some(due) = self.due.borrow_mut().pop_front() {
                return Some(due);
            }
            if self.dispatched.get() {
                return None;
            }
            self.ready.notified().await;
        }
    }

    fn record(&self, due: Instant, written: Instant, result: Result<u16, String>) {
        if !(self.measure_from..self.measure_until).contains(&due) {
            return;
        }
        let status = match result {
            Ok(status) => Some(status),
            Err(error) => {
                self.first_error.borrow_mut().get_or_insert(error);
                None
            }
        };
        self.samples.borrow_mut().push(Sample {
            due,
            delay: written.saturating_duration_since(due),
            status,
            latency: due.elapsed(),
        });
    }
}

/// Falls due `total` requests, `interval` apart from `first`, waking at each.
async fn dispatch(
    shared: &Shared,
    first: TimeSpec,
    start: Instant,
    interval: Duration,
    total: u64,
) -> io::Result<()> {
    let timer = TimerFd::new(ClockId::CLOCK_MONOTONIC, TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC)?;
    timer.set(
        Expiration::IntervalDelayed(first, TimeSpec::from_duration(interval)),
        TimerSetTimeFlags::TFD_TIMER_ABSTIME,
    )?;
    // `register` is the non-deprecated way, but unsafe, which the workspace forbids. The
    // condition it asks the caller to keep holds: `Ticks` owns the descriptor it names,
    // and the descriptor lives exactly as long as the `AsyncFd` that owns `Ticks`.
    #[allow(deprecated)]
    let ticks = AsyncFd::new(Ticks(timer))?;
    let interval_ns = u64::try_from(interval.as_nanos()).expect("an interval under 584 years");
    let mut next = 0u64;
    while next < total {
        let mut guard = ticks.readable().await?;
        // The count of expirations since the last read is not needed: due times are
        // computed, so a late wake-up sends everything due by now.
        match guard.try_io(|ticks| ticks.get_ref().0.wait().map_err(io::Error::from)) {
            Ok(result) => result?,
            Err(_would_block) => continue,
        }
        let now = Instant::now();
        let mut queue = shared.due.borrow_mut();
        while next < total {
            // Whole nanoseconds, as the timer counts: a due time is never after its tick.
            let due = start + Duration::from_nanos(interval_ns * next);
            if due > now {
                break;
            }
            if (shared.measure_from..shared.measure_until).contains(&due) {
                shared.measured.set(shared.measured.get() + 1);
            }
            queue.push_back(due);
            shared.ready.notify_one();
            next += 1;
        }
    }
    shared.dispatched.set(true);
    shared.ready.notify_waiters();
    Ok(())
}

/// One keep-alive connection: sends each request due that it takes, reconnecting after
/// an error or a `Connection: close`.
async fn connection(shared: Rc<Shared>, args: Rc<Args>) {
    let mut stream: Option<TcpStream> = None;
    let mut buffer = Vec::with_capacity(16 * 1024);
    while let Some(due) = shared.next_due().await {
        let written = Instant::now();
        let result = exchange(&mut stream, &args, &mut buffer).await;
        if result.is_err() {
            stream = None;
        }
        shared.record(due, written, result);
    }
}

/// One request and its whole response; the response's status.
async fn exchange(stream: &mut Option<TcpStream>, args: &Args, buffer: &mut Vec<u8>) -> Result<u16, String> {
    let socket = match stream {
        Some(socket) => socket,
        None => {
            let socket = TcpStream::connect(args.address).await.map_err(|e| format!("connect: {e}"))?;
            socket.set_nodelay(true).map_err(|e| e.to_string())?;
            stream.insert(socket)
        }
    };
    socket.write_all(&args.request).await.map_err(|e| format!("write: {e}"))?;
    buffer.clear();
    let (status, head_len, body_len, close) = loop {
        if buffer.capacity() - buffer.len() < 4096 {
            buffer.reserve(16 * 1024);
        }
        if socket.read_buf(buffer).await.map_err(|e| format!("read: {e}"))? == 0 {
            return Err("the server closed the connection before a whole response".into());
        }
        let mut headers = [httparse::EMPTY_HEADER; MAX_RESPONSE_HEADERS];
        let mut response = httparse::Response::new(&mut headers);
        match response.parse(buffer) {
            Ok(httparse::Status::Complete(head_len)) => {
                let status = response.code.unwrap_or_default();
                let (body_len, close) = framing(response.headers)?;
                break (status, head_len, body_len, close);
            }
            Ok(httparse::Status::Partial) => {}
            Err(e) => return Err(format!("bad response head: {e}")),
        }
    };
    let end = head_len + body_len;
    while buffer.len() < end {
        buffer.reserve(end - buffer.len());
        if socket.read_buf(buffer).await.map_err(|e| format!("read: {e}"))? == 0 {
            return Err("the server closed the connection before the end of a response body".into());
        }
    }
    if buffer.len() > end {
        return Err("the server sent more than the response's Content-Length".into());
    }
    if close {
        *stream = None;
    }
    Ok(status)
}

/// The response body's length and whether the server closes after it.
fn framing(headers: &[httparse::Header<'_>]) -> Result<(usize, bool), String> {
    let (mut length, mut close) = (None, false);
    for header in headers {
        if header.name.eq_ignore_ascii_case("content-length") {
            let text = std::str::from_utf8(header.value).unwrap_or_default();
            length = Some(text.trim().parse().map_err(|_| format!("bad Content-Length {text:?}"))?);
        } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err("chunked responses are not supported: the server must send Content-Length".into());
        } else if header.name.eq_ignore_ascii_case("connection") {
            close |= header.value.eq_ignore_ascii_case(b"close");
        }
    }
    length.map(|length| (length, close)).ok_or_else(|| "a response without Content-Length".into())
}

fn micros(duration: Duration) -> f64 {
    (duration.as_nanos() as f64 / 100.0).round() / 10.0
}

fn nearest_rank(sorted: &[f64], pct: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((pct / 100.0 * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

async fn run(args: Args) -> Result<serde_json::Value, String> {
    let args = Rc::new(args);
    let interval = Duration::from_secs_f64(1.0 / args.rate);
    let total = ((args.warmup + args.duration) * args.rate).round() as u64;
    // Instant first: the timer's first expiry is then no earlier than the first due time.
    let clock_start = Instant::now();
    let clock = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).map_err(|e| e.to_string())?;
    let start = clock_start + LEAD;
    let wall_start = SystemTime::now() + LEAD;
    let first = clock + TimeSpec::from_duration(LEAD);
    let shared = Rc::new(Shared {
        due: RefCell::new(VecDeque::new()),
        ready: Notify::new(),
        dispatched: Cell::new(false),
        measure_from: start + Duration::from_secs_f64(args.warmup),
        measure_until: start + Duration::from_secs_f64(args.warmup + args.duration),
        samples: RefCell::new(Vec::with_capacity((args.duration * args.rate) as usize + 16)),
        measured: Cell::new(0),
        first_error: RefCell::new(None),
    });
    let tasks: Vec<_> = (0..args.connections)
        .map(|_| tokio::task::spawn_local(connection(shared.clone(), args.clone())))
        .collect();
    dispatch(&shared, first, start, interval, total).await.map_err(|e| format!("timer: {e}"))?;
    let all_done = async {
        for task in tasks {
            let _ = task.await;
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs_f64(args.timeout), all_done).await;

    let samples = shared.samples.take();
    let measured = shared.measured.get();
    let unanswered = measured.saturating_sub(samples.len() as u64);
    let mut log = io::BufWriter::new(
        std::fs::File::create(&args.log_file).map_err(|e| format!("{}: {e}", args.log_file))?,
    );
    // A request later than one connection's share of the schedule found every
    // connection busy (or the generator behind): the count h2load's `>gap` stands for.
    let gap = Duration::from_secs_f64(args.connections as f64 / args.rate);
    let late_starts = samples.iter().filter(|sample| sample.delay > gap).count();
    let (mut latencies, mut delays, mut errors, mut bad_status) = (Vec::new(), Vec::new(), unanswered, 0u64);
    for sample in &samples {
        let started = wall_start + sample.due.duration_since(start);
        let since_epoch = started.duration_since(UNIX_EPOCH).unwrap_or_default().as_micros();
        let status = sample.status.map_or(-1, i32::from);
        let latency = micros(sample.latency);
        writeln!(log, "{since_epoch}\t{status}\t{latency}").map_err(|e| format!("{}: {e}", args.log_file))?;
        delays.push(micros(sample.delay));
        match sample.status {
            Some(200..=299) => latencies.push(latency),
            Some(_) => bad_status += 1,
            None => errors += 1,
        }
    }
    log.flush().map_err(|e| format!("{}: {e}", args.log_file))?;
    latencies.sort_by(f64::total_cmp);
    delays.sort_by(f64::total_cmp);
    let mut first_error = shared.first_error.take();
    if unanswered > 0 && first_error.is_none() {
        first_error =
            Some(format!("{unanswered} requests had no response {}s after the last fell due", args.timeout));
    }
    Ok(serde_json::json!({
        "measured": measured,
        "succeeded": latencies.len(),
        "bad_status": bad_status,
        "errors": errors,
        "unanswered": unanswered,
        "first_error": first_error,
        "late_starts": late_starts,
        "p50_us": nearest_rank(&latencies, 50.0),
        "p99_us": nearest_rank(&latencies, 99.0),
        "start_delay_us": {
            "p50": nearest_rank(&delays, 50.0),
            "p99": nearest_rank(&delays, 99.0),
            "max": delays.last().copied().unwrap_or(0.0),
        },
    }))
}

fn main() {
    let args = match parse_args() {
        Ok(args) => args,
        Err(message) => {
            eprintln!("meshpy-openload: {message}\n{USAGE}");
            std::process::exit(2);
        }
    };
    let runtime =
        tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a tokio runtime");
    match tokio::task::LocalSet::new().block_on(&runtime, run(args)) {
        Ok(summary) => println!("{summary}"),
        Err(message) => {
            eprintln!("meshpy-openload: {message}");
            std::process::exit(1);
        }
    }
}
