//! The event decoder: any bytes either decode to an `Event` that round-trips through JSON and
//! validates or not (never a panic), or are refused.
#![no_main]

use ksync_core::{Event, EventLimits};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(event) = serde_json::from_slice::<Event>(data) else {
        return;
    };
    let _ = event.validate(&EventLimits::default());
    let json = serde_json::to_vec(&event).expect("an event always serialises");
    let again: Event = serde_json::from_slice(&json).expect("what we write we read");
    assert_eq!(again, event);
    assert!(again.same_content(&event));
});
