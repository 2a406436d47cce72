//! The memory allocator of the worker and the agent (mimalloc, each binary's
//! `#[global_allocator]`), and how memory freed by closed connections and streams goes back to
//! the system.
//!
//! Requests allocate many small short-lived objects (headers, futures, channels); mimalloc
//! handles that pattern with less CPU than glibc's malloc (measured with bench/proxy.sh).
//! It gives the pages it no longer uses back to the system (`madvise(MADV_DONTNEED)`) only
//! a while after they were freed (its `purge_delay`, 1 s): giving them back at once cost
//! about a fifth more CPU per request (measured with bench/connections.sh), and a delayed
//! purge runs only when mimalloc is next called on a thread, and each thread's freed pages
//! are collected only by that thread. After a burst of connections closes, a quiet worker
//! would keep their memory for good (10,000 idle connections' 260 MB stayed):
//! [`give_back_freed_memory`] runs the program-wide purge once a second, and each runtime
//! thread collects its own pages when it goes idle ([`give_back_when_idle`]).
//!
//! Transparent huge pages are off ([`no_huge_pages`]): mimalloc asks for them
//! on its arenas, and a 2 MiB page is resident as soon as one byte of it is used, which made
//! each idle connection cost 32 KB instead of 20 KB (10,000 held by bench/connections.sh), for
//! a CPU time per request within the bench's noise.

use std::cell::Cell;
use std::time::{Duration, Instant};

/// How often freed memory past mimalloc's purge delay goes back to the system.
const GIVE_BACK_EVERY: Duration = Duration::from_secs(1);

/// Turns transparent huge pages off for this process (before it has allocated much).
pub fn no_huge_pages() -> nix::Result<()> {
    nix::sys::prctl::set_thp_disable(true)
}

/// Gives freed memory back to the system, once a second, for good.
pub async fn give_back_freed_memory() {
    let mut ticks = tokio::time::interval(GIVE_BACK_EVERY);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        collect();
    }
}

/// For a runtime thread about to wait for work: gives back the pages this thread freed, at
/// most once every [`GIVE_BACK_EVERY`] (a busy thread parks and wakes often).
pub fn give_back_when_idle() {
    thread_local! {
        static LAST: Cell<Option<Instant>> = const { Cell::new(None) };
    }
    let now = Instant::now();
    if LAST.get().is_some_and(|last| now < last + GIVE_BACK_EVERY) {
        return;
    }
    LAST.set(Some(now));
    collect();
}

fn collect() {
    // SAFETY: `mi_collect` takes no pointer and may be called from any thread at any time;
    // not forced, it frees this thread's empty pages and purges (program-wide) only the
    // memory whose purge delay has passed.
    unsafe { libmimalloc_sys::mi_collect(false) };
}
