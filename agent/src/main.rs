//! `core-agent`: serves a local app through core-server without an inbound port (see the
//! library's documentation, and `core-agent --help`).

mod cli;

use std::process::ExitCode;

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
    // One thread: everything on the thread that runs `serve`, no wake-ups across threads.
    let runtime = match threads.get() {
        1 => tokio::runtime::Builder::new_current_thread(),
        n => {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            builder.worker_threads(n);
            builder
        }
    }
    .enable_all()
    .build()
    .expect("a tokio runtime");
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
