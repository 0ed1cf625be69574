//! When to retry an upstream request: statuses and failures worth a retry, exponential
//! backoff, `Retry-After` honoured up to a cap, and a budget of attempts and total wait.

use crate::config::RetryConfig;
use std::time::{Duration, SystemTime};

/// Statuses that say "try again later": 429 and the transient 5xx.
pub fn retryable_status(status: u16) -> bool {
    matches!(status, 429 | 500 | 502 | 503 | 504)
}

/// The retry budget of one request.
#[derive(Debug)]
pub struct Retries<'a> {
    cfg: &'a RetryConfig,
    attempts: u32,
    waited: Duration,
}

impl<'a> Retries<'a> {
    /// A fresh budget.
    pub fn new(cfg: &'a RetryConfig) -> Self {
        Retries {
            cfg,
            attempts: 0,
            waited: Duration::ZERO,
        }
    }

    /// Failed attempts so far.
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// Records a failed attempt (a retryable one, with the `Retry-After` it carried) and
    /// says how long to wait before the next, or `None` to give up: attempts or total
    /// wait exhausted, or a `Retry-After` beyond the cap.
    pub fn failed(&mut self, retry_after: Option<&str>) -> Option<Duration> {
        self.attempts += 1;
        if self.attempts >= self.cfg.max_attempts {
            return None;
        }
        let wait = match retry_after.and_then(parse_retry_after) {
            Some(asked) if asked > Duration::from_secs(self.cfg.max_retry_after_secs) => {
                return None
            }
            Some(asked) => asked,
            None => {
                let exp = self.attempts.saturating_sub(1).min(20);
                let backoff = self.cfg.initial_backoff_ms.saturating_mul(1u64 << exp);
                Duration::from_millis(backoff.min(self.cfg.max_backoff_ms))
            }
        };
        if self.waited + wait > Duration::from_secs(self.cfg.max_total_wait_secs) {
            return None;
        }
        self.waited += wait;
        Some(wait)
    }
}

/// A `Retry-After` value: delay seconds or an HTTP date.
fn parse_retry_after(v: &str) -> Option<Duration> {
    let v = v.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = httpdate::parse_http_date(v).ok()?;
    Some(
        when.duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> RetryConfig {
        RetryConfig {
            max_attempts: 4,
            initial_backoff_ms: 100,
            max_backoff_ms: 250,
            max_retry_after_secs: 5,
            max_total_wait_secs: 7,
        }
    }

    #[test]
    fn backoff_doubles_up_to_its_cap_and_stops_after_max_attempts() {
        let c = cfg();
        let mut r = Retries::new(&c);
        let mut waits = Vec::new();
        while let Some(w) = r.failed(None) {
            waits.push(w.as_millis());
        }
        assert_eq!(waits, vec![100, 200, 250]);
        assert_eq!(r.attempts(), 4);
    }

    #[test]
    fn retry_after_is_honoured_up_to_the_cap_and_the_total_budget() {
        let c = cfg();
        let mut r = Retries::new(&c);
        assert_eq!(r.failed(Some("3")), Some(Duration::from_secs(3)));
        // 3 + 5 > 7: the total budget says no.
        assert_eq!(r.failed(Some("5")), None);
        let mut r = Retries::new(&c);
        assert_eq!(r.failed(Some("3600")), None, "beyond the cap");
        let past = httpdate::fmt_http_date(SystemTime::now() - Duration::from_secs(60));
        assert_eq!(r.failed(Some(&past)), Some(Duration::ZERO));
    }

    #[test]
    fn only_transient_statuses_are_retried() {
        for s in [429, 500, 502, 503, 504] {
            assert!(retryable_status(s));
        }
        for s in [400, 401, 403, 404, 501] {
            assert!(!retryable_status(s));
        }
    }
}
