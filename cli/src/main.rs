//! capstan: the command line for people running Capstan.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

mod intentions;
mod job;

use clap::{Parser, Subcommand};
use intentions::IntentionsCommand;
use std::process::ExitCode;

#[derive(Parser, Debug)]
#[command(name = "capstan", version, about = "Capstan's command line")]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Service intentions.
    Intentions {
        #[command(subcommand)]
        command: IntentionsCommand,
    },
    /// Jobs (jobs.capstan.dev, cjob): status, versions, promotion, dispatch and plans.
    Job(job::JobArgs),
}

/// Exit codes: 0 done (allowed, no change), 1 the answer is no (denied, changes to
/// apply, a partial conversion), 2 an error.
#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let result = match args.command {
        Command::Intentions {
            command: IntentionsCommand::Check(check),
        } => check.run().await,
        Command::Job(job) => job.run().await,
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::from(2)
        }
    }
}
