//! Every fuzz target (`farm::fuzz::targets`): seeded inputs, none of which may panic, take
//! longer than a second, or allocate more than 64 MiB at once. Its own test binary, for
//! the counting allocator below.
//!
//! CI runs 10,000 inputs per target with a fixed seed. For a long run:
//! `FARM_FUZZ_INPUTS=1000000 FARM_FUZZ_SEED=$RANDOM cargo test --release --test fuzz -- --nocapture`
//! prints each target's count, slowest input and peak allocation. Findings are written to
//! `target/fuzz-findings/`, to become regression tests.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use farm::fuzz::{AllocationMeter, Limits, run, targets};

/// The system allocator, counting the bytes live at once.
struct Counting {
    live: AtomicUsize,
    peak: AtomicUsize,
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let live = self.live.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            self.peak.fetch_max(live, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        self.live.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            self.live.fetch_sub(layout.size(), Ordering::Relaxed);
            let live = self.live.fetch_add(new_size, Ordering::Relaxed) + new_size;
            self.peak.fetch_max(live, Ordering::Relaxed);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting {
    live: AtomicUsize::new(0),
    peak: AtomicUsize::new(0),
};

/// Peak bytes above what was live at the reset: what one input allocated at most.
struct Meter {
    base: AtomicUsize,
}

impl AllocationMeter for Meter {
    fn reset(&self) {
        let live = ALLOCATOR.live.load(Ordering::Relaxed);
        self.base.store(live, Ordering::Relaxed);
        ALLOCATOR.peak.store(live, Ordering::Relaxed);
    }

    fn peak(&self) -> usize {
        ALLOCATOR
            .peak
            .load(Ordering::Relaxed)
            .saturating_sub(self.base.load(Ordering::Relaxed))
    }
}

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name}={v} is not a number"))
        })
        .unwrap_or(default)
}

#[test]
fn no_parser_of_foreign_bytes_panics_hangs_or_allocates_without_bound() {
    let inputs = env_number("FARM_FUZZ_INPUTS", 10_000);
    let seed = env_number("FARM_FUZZ_SEED", 20261206);
    let meter = Meter {
        base: AtomicUsize::new(0),
    };
    let limits = Limits {
        slow: Duration::from_secs(1),
        peak_bytes: 64 << 20,
        meter: Some(&meter),
    };
    let findings_dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .unwrap()
        .join("fuzz-findings");
    let mut failed = Vec::new();
    println!("fuzz: {inputs} inputs per target, seed {seed}");
    println!(
        "{:<20} {:>10} {:>12} {:>12}",
        "target", "inputs", "slowest", "peak alloc"
    );
    for target in targets() {
        let outcome = run(&target, inputs, seed, &limits);
        println!(
            "{:<20} {:>10} {:>10.2?} {:>9} KiB",
            target.name,
            outcome.inputs,
            outcome.slowest,
            outcome.peak_bytes >> 10
        );
        for (i, finding) in outcome.findings.iter().enumerate() {
            fs_err::create_dir_all(&findings_dir).unwrap();
            let file = findings_dir.join(format!("{}-{seed}-{i}.bin", target.name));
            fs_err::write(&file, &finding.input).unwrap();
            failed.push(format!(
                "{}: {} (input in `{}`: {:?})",
                target.name,
                finding.what,
                file.display(),
                String::from_utf8_lossy(&finding.input[..finding.input.len().min(200)])
            ));
        }
        assert_eq!(outcome.inputs, inputs);
    }
    assert!(failed.is_empty(), "findings:\n{}", failed.join("\n"));
}
