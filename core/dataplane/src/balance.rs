//! Endpoint selection: round robin, least request, and power of two choices over
//! peak-EWMA latency (Linkerd's default balancer).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::config::LbPolicy;

/// How long an endpoint that refused a connection is skipped by the balancer.
const EJECTION: Duration = Duration::from_secs(2);
/// Decay window of the latency average: old samples lose weight over this time.
const EWMA_DECAY: Duration = Duration::from_secs(10);
/// Cost assumed for an endpoint with no latency sample yet, so new endpoints get tried.
const DEFAULT_RTT: Duration = Duration::from_millis(1);

pub struct Endpoint {
    pub address: String,
    in_flight: AtomicUsize,
    ewma: Mutex<Ewma>,
    /// Milliseconds since the balancer's epoch until which the endpoint is skipped.
    ejected_until_ms: AtomicU64,
}

struct Ewma {
    value_ns: f64,
    updated: Instant,
}

impl Endpoint {
    fn new(address: String) -> Self {
        Self {
            address,
            in_flight: AtomicUsize::new(0),
            ewma: Mutex::new(Ewma { value_ns: DEFAULT_RTT.as_nanos() as f64, updated: Instant::now() }),
            ejected_until_ms: AtomicU64::new(0),
        }
    }

    /// Peak-EWMA: a slower sample replaces the average at once, faster ones decay it.
    fn observe(&self, rtt: Duration, now: Instant) {
        let mut ewma = self.ewma.lock().unwrap();
        let sample = rtt.as_nanos() as f64;
        if sample > ewma.value_ns {
            ewma.value_ns = sample;
        } else {
            let elapsed = now.saturating_duration_since(ewma.updated).as_secs_f64();
            let decay = (-elapsed / EWMA_DECAY.as_secs_f64()).exp();
            ewma.value_ns = ewma.value_ns * decay + sample * (1.0 - decay);
        }
        ewma.updated = now;
    }

    /// The latency estimate times the requests in flight. As in Linkerd's peak-EWMA, the
    /// estimate decays toward zero while the endpoint goes unobserved: an endpoint once
    /// slow (a cold connection, a handshake) is not shunned forever by a balancer that only
    /// ever picks its cheaper rival.
    fn cost(&self, now: Instant) -> f64 {
        let pending = self.in_flight.load(Relaxed) as f64;
        let ewma = self.ewma.lock().unwrap();
        let idle = now.saturating_duration_since(ewma.updated).as_secs_f64();
        ewma.value_ns * (-idle / EWMA_DECAY.as_secs_f64()).exp() * (pending + 1.0)
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Relaxed)
    }
}

pub struct Balancer {
    policy: LbPolicy,
    endpoints: Vec<Arc<Endpoint>>,
    next: AtomicUsize,
    epoch: Instant,
}

/// Marks one request in flight on an endpoint; dropping it ends the request.
pub struct InFlight {
    endpoint: Arc<Endpoint>,
    started: Instant,
}

impl InFlight {
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// Feeds the time to first response, which arrived at `now`, into the endpoint's
    /// latency average.
    pub fn observe_latency(&self, now: Instant) {
        self.endpoint.observe(now.saturating_duration_since(self.started), now);
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.endpoint.in_flight.fetch_sub(1, Relaxed);
    }
}

impl Balancer {
    pub fn new(policy: LbPolicy, addresses: &[String]) -> Self {
        Self {
            policy,
            endpoints: addresses.iter().map(|a| Arc::new(Endpoint::new(a.clone()))).collect(),
            next: AtomicUsize::new(fastrand::usize(..usize::MAX / 2)),
            epoch: Instant::now(),
        }
    }

    pub fn endpoints(&self) -> &[Arc<Endpoint>] {
        &self.endpoints
    }

    fn ms_since_epoch(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.epoch).as_millis() as u64
    }

    /// Skips an endpoint for a short while after it refused a connection.
    pub fn eject(&self, endpoint: &Endpoint) {
        endpoint
            .ejected_until_ms
            .store(self.ms_since_epoch(Instant::now()) + EJECTION.as_millis() as u64, Relaxed);
    }

    fn available(&self, endpoint: &Endpoint, now_ms: u64) -> bool {
        endpoint.ejected_until_ms.load(Relaxed) <= now_ms
    }

    /// Picks an endpoint, avoiding `exclude` (an index already tried) and ejected
    /// endpoints when any other is available.
    pub fn pick(&self, exclude: Option<usize>) -> Option<(usize, InFlight)> {
        self.pick_at(exclude, Instant::now())
    }

    /// [`Self::pick`] for a request that started at `now`, a time the caller already read:
    /// ejections, both candidates' decay and the request's start share it.
    pub fn pick_at(&self, exclude: Option<usize>, now: Instant) -> Option<(usize, InFlight)> {
        let n = self.endpoints.len();
        if n == 0 || (n == 1 && exclude == Some(0)) {
            return None;
        }
        let now_ms = self.ms_since_epoch(now);
        let usable = |i: usize| Some(i) != exclude && self.available(&self.endpoints[i], now_ms);
        let index = match self.policy {
            LbPolicy::RoundRobin => {
                let start = self.next.fetch_add(1, Relaxed);
                (0..n).map(|k| (start + k) % n).find(|&i| usable(i))
            }
            LbPolicy::LeastRequest => self.best_of_two(&usable, |e| e.in_flight() as f64),
            LbPolicy::P2cEwma => self.best_of_two(&usable, |e| e.cost(now)),
        };
        // Every endpoint ejected: still try one rather than fail without trying.
        let index = index.or_else(|| (0..n).find(|&i| Some(i) != exclude))?;
        let endpoint = self.endpoints[index].clone();
        endpoint.in_flight.fetch_add(1, Relaxed);
        Some((index, InFlight { endpoint, started: now }))
    }

    /// Two distinct random candidates, the cheaper wins; falls back to the first
    /// usable endpoint when neither candidate is usable.
    fn best_of_two(&self, usable: &dyn Fn(usize) -> bool, cost: impl Fn(&Endpoint) -> f64) -> Option<usize> {
        let n = self.endpoints.len();
        let a = fastrand::usize(..n);
        let b = if n > 1 { (a + 1 + fastrand::usize(..n - 1)) % n } else { a };
        match (usable(a), usable(b)) {
            (true, true) => Some(if cost(&self.endpoints[a]) <= cost(&self.endpoints[b]) { a } else { b }),
            (true, false) => Some(a),
            (false, true) => Some(b),
            (false, false) => (0..n).find(|&i| usable(i)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addresses(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("127.0.0.1:{}", 8000 + i)).collect()
    }

    #[test]
    fn round_robin_cycles_through_every_endpoint() {
        let lb = Balancer::new(LbPolicy::RoundRobin, &addresses(3));
        let mut counts = [0; 3];
        for _ in 0..30 {
            counts[lb.pick(None).unwrap().0] += 1;
        }
        assert_eq!(counts, [10, 10, 10]);
    }

    #[test]
    fn least_request_avoids_the_busy_endpoint() {
        let lb = Balancer::new(LbPolicy::LeastRequest, &addresses(2));
        let (busy, _held) = lb.pick(None).unwrap();
        for _ in 0..20 {
            assert_ne!(lb.pick(None).unwrap().0, busy);
        }
    }

    #[test]
    fn p2c_ewma_prefers_the_fast_endpoint() {
        let lb = Balancer::new(LbPolicy::P2cEwma, &addresses(2));
        lb.endpoints[0].observe(Duration::from_millis(200), Instant::now());
        lb.endpoints[1].observe(Duration::from_micros(500), Instant::now());
        for _ in 0..20 {
            assert_eq!(lb.pick(None).unwrap().0, 1);
        }
    }

    #[test]
    fn p2c_ewma_retries_an_endpoint_whose_slow_sample_has_aged() {
        let lb = Balancer::new(LbPolicy::P2cEwma, &addresses(2));
        lb.endpoints[0].observe(Duration::from_millis(200), Instant::now());
        lb.endpoints[1].observe(Duration::from_micros(500), Instant::now());
        // Two minutes without a sample: the old 200 ms has decayed far below the fresh 0.5 ms.
        let aged = Instant::now().checked_sub(Duration::from_secs(120)).unwrap();
        lb.endpoints[0].ewma.lock().unwrap().updated = aged;
        assert_eq!(lb.pick(None).unwrap().0, 0);
    }

    #[test]
    fn ejected_endpoint_is_skipped_and_exclusion_is_honoured() {
        let lb = Balancer::new(LbPolicy::RoundRobin, &addresses(2));
        lb.eject(&lb.endpoints[0]);
        for _ in 0..10 {
            assert_eq!(lb.pick(None).unwrap().0, 1);
        }
        assert_eq!(lb.pick(Some(1)).unwrap().0, 0, "all others ejected: still try one");
        let single = Balancer::new(LbPolicy::RoundRobin, &addresses(1));
        assert!(single.pick(Some(0)).is_none());
    }
}
