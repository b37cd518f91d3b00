//! pvm-vhost-user-net: a tap as a vhost-user net device.

use std::path::PathBuf;

use clap::Parser;
use pvm_common::logger::to_stderr;
use pvm_vhost_user::cli;
use pvm_vhost_user::net::TapBackend;

const NAME: &str = "pvm-vhost-user-net";

#[derive(Parser, Debug)]
#[command(
    name = NAME,
    version,
    about = "pvm-vhost-user-net: a tap as a vhost-user net device",
    long_about = "Serves the tap NAME as a virtio-net device to one vhost-user frontend (pvm's \
                  --net vhost-user=SOCKET, or any VMM that speaks vhost-user): IFF_VNET_HDR, the \
                  checksum and segmentation offloads the driver accepts, mergeable receive \
                  buffers, EVENT_IDX. Exits 0 when the frontend disconnects, 1 on a failure while \
                  serving, 2 on a bad command line or a tap that cannot be attached."
)]
struct Args {
    /// The vhost-user socket to listen on (a stale socket file is replaced).
    #[arg(long, value_name = "PATH", value_parser = cli::parse_socket)]
    socket: PathBuf,

    /// The tap interface (created if missing and permitted).
    #[arg(long, value_name = "NAME")]
    tap: String,

    /// The guest's MAC address (default: a random locally administered one).
    #[arg(long, value_name = "MAC", value_parser = cli::parse_mac)]
    mac: Option<[u8; 6]>,

    #[command(flatten)]
    common: cli::CommonArgs,
}

fn main() {
    let args = match cli::parse::<Args>(NAME, std::env::args_os()) {
        Ok(args) => args,
        Err(code) => std::process::exit(code),
    };
    cli::init_logger(NAME, args.common.log_level);
    let backend = match TapBackend::open(&args.tap, args.mac) {
        Ok(backend) => backend,
        Err(e) => {
            to_stderr(&format!("{NAME}: --{e}\n"));
            std::process::exit(cli::USAGE_ERROR);
        }
    };
    let mac = backend.mac();
    let what = format!(
        "tap {} (mac {:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x})",
        args.tap, mac[0], mac[1], mac[2], mac[3], mac[4], mac[5]
    );
    std::process::exit(cli::run(
        NAME,
        backend,
        &args.socket,
        args.common.seccomp,
        &what,
    ));
}
