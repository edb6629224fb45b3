//! [`MetricsMeter`]: the one place where a transport's counters become [`Metrics`].
//!
//! No clock here: the transport says how long the period was.

use std::time::Duration;

use crate::Metrics;

/// Shortest period a rate is computed over: a report right after the previous one (or a
/// clock that did not move) would otherwise divide by zero.
const MIN_PERIOD: Duration = Duration::from_millis(1);

/// A transport's running totals (from its start; they only grow), read whenever a `metrics`
/// notification is due.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MeterTotals {
    /// Events sent plus received.
    pub events: u64,
    /// Bytes sent plus received.
    pub bytes: u64,
    /// Round trips measured (acknowledged sends, requests, pings: whatever the transport
    /// reports as its latency).
    pub round_trips: u64,
    /// Sum of those round trips, in microseconds.
    pub round_trip_micros: u64,
}

impl MeterTotals {
    /// Counts one measured round trip.
    pub fn add_round_trip(&mut self, round_trip: Duration) {
        self.round_trips = self.round_trips.saturating_add(1);
        self.round_trip_micros = self.round_trip_micros.saturating_add(micros(round_trip));
    }
}

/// A round trip in whole microseconds (saturating: a `Duration` can exceed `u64` of them).
fn micros(round_trip: Duration) -> u64 {
    u64::try_from(round_trip.as_micros()).unwrap_or(u64::MAX)
}

/// Turns [`MeterTotals`] into the [`Metrics`] of the period since the previous report: what
/// happened in between (the totals' differences), as rates over the period's length and the
/// mean round trip.
#[derive(Debug, Clone, Default)]
pub struct MetricsMeter {
    last: MeterTotals,
}

impl MetricsMeter {
    /// A meter whose first period starts at `totals` (use `default()` for totals counted
    /// from zero).
    pub fn new(totals: MeterTotals) -> Self {
        Self { last: totals }
    }

    /// The figures of the period that ends with `totals`, `elapsed` after the previous report
    /// (or [`new`](Self::new)); the next period starts here.
    ///
    /// Zero-safe: a period with no round trips has an `average_latency` of 0, one shorter
    /// than 1 ms counts as 1 ms (rates stay finite), and totals below the previous ones (a
    /// transport that restarted its counts) count as nothing happened.
    pub fn report(&mut self, totals: MeterTotals, elapsed: Duration) -> Metrics {
        let secs = elapsed.max(MIN_PERIOD).as_secs_f64();
        let events = totals.events.saturating_sub(self.last.events);
        let bytes = totals.bytes.saturating_sub(self.last.bytes);
        let round_trips = totals.round_trips.saturating_sub(self.last.round_trips);
        let micros = totals
            .round_trip_micros
            .saturating_sub(self.last.round_trip_micros);
        self.last = totals;
        Metrics {
            events_per_second: events as f64 / secs,
            average_latency: if round_trips == 0 {
                0.0
            } else {
                micros as f64 / round_trips as f64 / 1000.0
            },
            bandwidth_usage: bytes as f64 / secs,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn totals(events: u64, bytes: u64, round_trips: u64, round_trip_micros: u64) -> MeterTotals {
        MeterTotals {
            events,
            bytes,
            round_trips,
            round_trip_micros,
        }
    }

    #[test]
    fn rates_are_per_second_and_latency_is_the_mean_in_ms() {
        let mut meter = MetricsMeter::default();
        let m = meter.report(totals(50, 20_000, 4, 10_000), Duration::from_secs(2));
        assert_eq!(
            m,
            Metrics {
                events_per_second: 25.0,
                average_latency: 2.5,
                bandwidth_usage: 10_000.0,
            }
        );
    }

    #[test]
    fn a_period_without_round_trips_has_zero_latency() {
        let mut meter = MetricsMeter::default();
        let m = meter.report(totals(10, 100, 0, 0), Duration::from_secs(1));
        assert_eq!(m.average_latency, 0.0);
        assert_eq!(m.events_per_second, 10.0);
        // Round trips of an earlier period do not leak into a later one without any.
        meter.report(totals(10, 100, 2, 4_000), Duration::from_secs(1));
        let m = meter.report(totals(11, 150, 2, 4_000), Duration::from_secs(1));
        assert_eq!(m.average_latency, 0.0);
    }

    #[test]
    fn zero_elapsed_time_gives_finite_figures() {
        let mut meter = MetricsMeter::default();
        let idle = meter.report(MeterTotals::default(), Duration::ZERO);
        assert_eq!(idle, Metrics::default());
        let busy = meter.report(totals(3, 1_000, 1, 500), Duration::ZERO);
        assert!(busy.events_per_second.is_finite() && busy.bandwidth_usage.is_finite());
        // Counted over the 1 ms floor.
        assert_eq!(busy.events_per_second, 3_000.0);
        assert_eq!(busy.bandwidth_usage, 1_000_000.0);
        assert_eq!(busy.average_latency, 0.5);
    }

    #[test]
    fn each_report_counts_only_what_happened_since_the_previous_one() {
        let mut meter = MetricsMeter::new(totals(100, 1_000, 10, 10_000));
        let first = meter.report(totals(110, 3_000, 12, 16_000), Duration::from_secs(1));
        assert_eq!(first.events_per_second, 10.0);
        assert_eq!(first.bandwidth_usage, 2_000.0);
        assert_eq!(first.average_latency, 3.0);
        let second = meter.report(totals(130, 3_500, 13, 17_000), Duration::from_secs(4));
        assert_eq!(second.events_per_second, 5.0);
        assert_eq!(second.bandwidth_usage, 125.0);
        assert_eq!(second.average_latency, 1.0);
        // Nothing new: all zero, whatever the length.
        let third = meter.report(totals(130, 3_500, 13, 17_000), Duration::from_secs(5));
        assert_eq!(third, Metrics::default());
    }

    #[test]
    fn totals_that_went_back_count_as_nothing() {
        let mut meter = MetricsMeter::new(totals(100, 1_000, 10, 10_000));
        let m = meter.report(totals(5, 10, 1, 10), Duration::from_secs(1));
        assert_eq!(m, Metrics::default());
        // The lower totals are the new baseline.
        let m = meter.report(totals(6, 20, 1, 10), Duration::from_secs(1));
        assert_eq!(m.events_per_second, 1.0);
        assert_eq!(m.bandwidth_usage, 10.0);
    }

    #[test]
    fn round_trips_accumulate_in_micros() {
        let mut t = MeterTotals::default();
        t.add_round_trip(Duration::from_micros(1_500));
        t.add_round_trip(Duration::from_millis(2));
        assert_eq!((t.round_trips, t.round_trip_micros), (2, 3_500));
        t.add_round_trip(Duration::MAX);
        assert_eq!(t.round_trip_micros, u64::MAX);
    }
}
