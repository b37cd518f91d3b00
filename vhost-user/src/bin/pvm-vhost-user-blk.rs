//! pvm-vhost-user-blk: a raw image file as a vhost-user block device.

use std::path::PathBuf;

use clap::Parser;
use pvm_common::logger::to_stderr;
use pvm_vhost_user::block::BlockBackend;
use pvm_vhost_user::cli;

const NAME: &str = "pvm-vhost-user-blk";

#[derive(Parser, Debug)]
#[command(
    name = NAME,
    version,
    about = "pvm-vhost-user-blk: a raw disk image as a vhost-user block device",
    long_about = "Serves FILE as a virtio-blk device to one vhost-user frontend (pvm's \
                  --disk vhost-user=SOCKET, or any VMM that speaks vhost-user): IN, OUT, FLUSH \
                  (fdatasync), GET_ID, DISCARD and WRITE_ZEROES; `ro` refuses writes. The image is \
                  locked while served. Exits 0 when the frontend disconnects, 1 on a failure \
                  while serving, 2 on a bad command line."
)]
struct Args {
    /// The vhost-user socket to listen on (a stale socket file is replaced).
    #[arg(long, value_name = "PATH", value_parser = cli::parse_socket)]
    socket: PathBuf,

    /// The raw image to serve; `ro` makes the device read-only.
    #[arg(long, value_name = "FILE[,ro]", value_parser = cli::parse_disk)]
    disk: cli::DiskArg,

    #[command(flatten)]
    common: cli::CommonArgs,
}

fn main() {
    let args = match cli::parse::<Args>(NAME, std::env::args_os()) {
        Ok(args) => args,
        Err(code) => std::process::exit(code),
    };
    cli::init_logger(NAME, args.common.log_level);
    let backend = match BlockBackend::open(&args.disk.path, args.disk.read_only, None) {
        Ok(backend) => backend,
        Err(e) => {
            to_stderr(&format!("{NAME}: --{e}\n"));
            std::process::exit(cli::USAGE_ERROR);
        }
    };
    let what = format!(
        "{} ({} sectors{})",
        args.disk.path.display(),
        backend.disk().sectors(),
        if args.disk.read_only {
            ", read-only"
        } else {
            ""
        }
    );
    std::process::exit(cli::run(
        NAME,
        backend,
        &args.socket,
        args.common.seccomp,
        &what,
    ));
}
