//! `core-agent`: serves a local app through core-server without an inbound port (see the
//! library's documentation, and `core-agent --help`).

mod cli;

use std::process::ExitCode;

use core_server_proto::allocator;

// Freed memory goes back to the system: see `core_server_proto::allocator`.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // First: reading the configuration may warn (a token file others may read).
    core_server_proto::logging::init();
    let cli::Parsed {
        config,
        app,
        threads,
    } = match cli::parse() {
        Ok(parsed) => parsed,
        Err(message) => {
            eprintln!("core-agent: {message}");
            return ExitCode::from(2);
        }
    };
    // Memory per stream, not correctness: a kernel without it is served all the same.
    if let Err(e) = allocator::no_huge_pages() {
        tracing::warn!("cannot turn transparent huge pages off: {e}");
    }
    // One thread: everything on the thread that runs `serve`, no wake-ups across threads.
    let runtime = match threads.get() {
        1 => tokio::runtime::Builder::new_current_thread(),
        n => {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            builder.worker_threads(n);
            builder
        }
    }
    .on_thread_park(allocator::give_back_when_idle)
    .enable_all()
    .build()
    .expect("a tokio runtime");
    // It never ends: the runtime drops it when `serve` returns.
    runtime.spawn(allocator::give_back_freed_memory());
    let served = runtime.block_on(core_agent::serve(
        config,
        core_agent::forward_to(app),
        core_agent::sigterm_or_sigint(),
    ));
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("core-agent: {e}");
            ExitCode::from(2)
        }
    }
}
