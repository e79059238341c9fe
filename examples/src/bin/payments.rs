//! The payments API on the embedded store (or Redis when `REDIS_URL` is set). What it reads from
//! the environment and how it starts and stops: [`idem_examples::serve`].

fn main() -> std::process::ExitCode {
    idem_examples::serve::main()
}
