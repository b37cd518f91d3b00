//! The `pvm` binary: parse the command line, run the VM, turn the outcome into an exit code.

fn main() {
    std::process::exit(pvm::main_with_args(std::env::args_os()));
}
