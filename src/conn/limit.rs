//! Token buckets: the per-connection frame and byte rates and the per-IP
//! accept rate. Time is passed in (milliseconds of the monotonic clock), so
//! the arithmetic is tested without sleeping.

/// A bucket of `burst` tokens refilled at `rate_per_s`. It may go into
/// debt (a read of many bytes is taken whole); callers wait until it is
/// positive again.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate_per_s: u64,
    burst_milli: i64,
    /// Tokens × 1000, so that slow rates refill smoothly.
    tokens_milli: i64,
    last_ms: u64,
}

impl TokenBucket {
    /// A full bucket. `rate_per_s` 0 means unlimited.
    pub fn new(rate_per_s: u64, burst: u64, now_ms: u64) -> TokenBucket {
        let burst_milli = i64::try_from(burst.saturating_mul(1000)).unwrap_or(i64::MAX);
        TokenBucket {
            rate_per_s,
            burst_milli,
            tokens_milli: burst_milli,
            last_ms: now_ms,
        }
    }

    fn refill(&mut self, now_ms: u64) {
        let elapsed = now_ms.saturating_sub(self.last_ms);
        self.last_ms = self.last_ms.max(now_ms);
        // rate per second × ms = milli-tokens.
        let gained = i64::try_from(elapsed.saturating_mul(self.rate_per_s)).unwrap_or(i64::MAX);
        self.tokens_milli = self
            .tokens_milli
            .saturating_add(gained)
            .min(self.burst_milli);
    }

    /// Whether a whole token is there to take now.
    pub fn ready(&mut self, now_ms: u64) -> bool {
        if self.rate_per_s == 0 {
            return true;
        }
        self.refill(now_ms);
        self.tokens_milli >= 1000
    }

    /// Takes `n` tokens, going into debt if there are fewer.
    pub fn take(&mut self, n: u64, now_ms: u64) {
        if self.rate_per_s == 0 {
            return;
        }
        self.refill(now_ms);
        let cost = i64::try_from(n.saturating_mul(1000)).unwrap_or(i64::MAX);
        self.tokens_milli = self.tokens_milli.saturating_sub(cost);
    }

    /// Takes one token if there is one.
    pub fn try_take_one(&mut self, now_ms: u64) -> bool {
        if !self.ready(now_ms) {
            return false;
        }
        self.take(1, now_ms);
        true
    }

    /// Milliseconds until [`TokenBucket::ready`] turns true (0 if it is).
    pub fn wait_ms(&mut self, now_ms: u64) -> u64 {
        if self.ready(now_ms) {
            return 0;
        }
        // Milli-tokens missing for a whole token, at rate_per_s per ms.
        let missing = (1000 - self.tokens_milli).max(1) as u64;
        missing.div_ceil(self.rate_per_s).max(1)
    }

    /// Whether the bucket is full again (it can be forgotten).
    pub fn is_full(&mut self, now_ms: u64) -> bool {
        self.ready(now_ms);
        self.tokens_milli >= self.burst_milli
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_bucket_allows_its_burst_then_refills_at_its_rate() {
        let mut bucket = TokenBucket::new(10, 10, 0);
        for _ in 0..10 {
            assert!(bucket.try_take_one(0));
        }
        assert!(!bucket.try_take_one(0));
        assert_eq!(bucket.wait_ms(0), 100);
        assert!(!bucket.try_take_one(99));
        assert!(bucket.try_take_one(100));
        // Never more than the burst, however long it rests.
        assert!(bucket.is_full(1_000_000));
        let mut taken = 0;
        while bucket.try_take_one(1_000_000) {
            taken += 1;
        }
        assert_eq!(taken, 10);
    }

    #[test]
    fn debt_is_paid_back_before_anything_more_is_allowed() {
        let mut bucket = TokenBucket::new(1000, 1000, 0);
        bucket.take(3000, 0);
        assert!(!bucket.ready(0));
        assert_eq!(bucket.wait_ms(0), 2001);
        assert!(!bucket.ready(2000));
        assert!(bucket.ready(2001));
    }

    #[test]
    fn rate_zero_is_unlimited() {
        let mut bucket = TokenBucket::new(0, 0, 0);
        bucket.take(u64::MAX, 0);
        assert!(bucket.ready(0));
        assert_eq!(bucket.wait_ms(0), 0);
    }
}
