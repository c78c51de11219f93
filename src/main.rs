//! The `paysync` command line: parses arguments, loads settings, runs a command and
//! maps errors to exit codes (2 for invalid configuration).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use paysync::config::{ConfigError, Settings, Sources, EXIT_CONFIG};

#[derive(Parser)]
#[command(
    name = "paysync",
    version,
    about = "Kafka-driven payment status synchronizer",
    propagate_version = true
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Validate the configuration and print it with secrets masked.
    CheckConfig {
        /// TOML settings file.
        #[arg(long, env = "PAYSYNC_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Print the Avro schemas (event and request).
    Schema,
}

fn load(config: Option<PathBuf>) -> Result<Settings, ConfigError> {
    Settings::load(&Sources::from_process(config))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Schema => {
            println!("{}", paysync::codec::avro::EVENT_SCHEMA_JSON.trim_end());
            println!("{}", paysync::codec::avro::REQUEST_SCHEMA_JSON.trim_end());
            ExitCode::SUCCESS
        }
        Command::CheckConfig { config } => match load(config) {
            Ok(settings) => {
                print!("{}", settings.to_masked_toml());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("paysync: {e}");
                ExitCode::from(EXIT_CONFIG as u8)
            }
        },
    }
}
