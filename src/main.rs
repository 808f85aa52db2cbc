fn main() -> std::process::ExitCode {
    farm::cli::main()
}
