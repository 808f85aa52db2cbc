//! `farm test [NAME…]`: runs farm.toml's `[tests]` against the lab, each from its start
//! snapshot (see `run::lab_test`).

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use crate::build::realise::RealiseOptions;
use crate::model::lab::test_report::{github_summary, junit_xml};
use crate::progress::Reporter;
use crate::project::{Project, ProjectOptions, UsageError};
use crate::run::lab::UpOptions;
use crate::run::lab_test::{TestOptions, run_tests};

use super::build::AccelArg;
use super::lab::StateArgs;

#[derive(Debug, Args)]
pub struct TestArgs {
    /// Tests to run, in this order [default: all, in name order].
    pub names: Vec<String>,
    /// Write a JUnit XML report here: one testcase per test.
    #[arg(long, value_name = "FILE")]
    pub junit: Option<PathBuf>,
    /// Leave the lab of a failed test running (it is saved as a snapshot either way).
    #[arg(long)]
    pub keep: bool,
    /// Run each test this many times, each run reported on its own (`NAME#2`, …).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub repeat: u32,
    /// Run a failing test again up to this many times; one that then passes is reported
    /// as flaky, with its failed attempts.
    #[arg(long, default_value_t = 0)]
    pub retries: u32,
    /// Accelerator, overriding every target's `accel`, when the lab is made.
    #[arg(long, env = "FARM_ACCEL", value_enum)]
    pub accel: Option<AccelArg>,
    /// Seconds a VM may take to answer ssh when the lab is made.
    #[arg(long, env = "FARM_BOOT_TIMEOUT", default_value_t = crate::build::realise::DEFAULT_BOOT_TIMEOUT_SECS)]
    pub boot_timeout: u64,
    #[command(flatten)]
    pub state: StateArgs,
}

pub fn run(options: &ProjectOptions, args: TestArgs, reporter: &Reporter) -> anyhow::Result<()> {
    let mut project = Project::load(options)?;
    let declared = &project.loaded.config.tests;
    if declared.is_empty() {
        return Err(UsageError {
            message: format!("`{}` declares no tests", project.config_path.display()),
            hint: "add `[tests.NAME]` with `script = \"path/to/script\"`; see README.md".into(),
        }
        .into());
    }
    let names: Vec<String> = if args.names.is_empty() {
        declared.keys().cloned().collect()
    } else {
        args.names.clone()
    };
    let mut tests = Vec::new();
    for name in &names {
        let Some(test) = declared.get(name) else {
            return Err(UsageError {
                message: format!(
                    "`{name}` is not a test of `{}`",
                    project.config_path.display()
                ),
                hint: format!(
                    "tests: {}",
                    declared.keys().cloned().collect::<Vec<_>>().join(", ")
                ),
            }
            .into());
        };
        tests.push(test.clone());
    }
    let state_root = args.state.dir(&project);
    let test_options = TestOptions {
        tests,
        up: UpOptions {
            names: Vec::new(),
            dry_run: false,
            realise: RealiseOptions {
                accel: args.accel.map(Into::into),
                boot_timeout: Duration::from_secs(args.boot_timeout),
                jobs: super::build::default_jobs(),
                ..RealiseOptions::default()
            },
            caches: Default::default(),
            stop_timeout: Duration::from_secs(60),
            boot: false,
        },
        keep: args.keep,
        repeat: args.repeat,
        retries: args.retries,
        echo: true,
        github: std::env::var("GITHUB_ACTIONS").is_ok_and(|v| v == "true"),
    };
    let results = run_tests(&mut project, &state_root, &test_options, reporter)?;
    if let Some(path) = &args.junit {
        fs_err::write(path, junit_xml("farm test", &results))?;
    }
    if test_options.github
        && let Some(summary) = std::env::var_os("GITHUB_STEP_SUMMARY")
    {
        use std::io::Write;
        let mut file = fs_err::OpenOptions::new()
            .create(true)
            .append(true)
            .open(PathBuf::from(summary))?;
        file.write_all(github_summary(&results).as_bytes())?;
    }
    let failed: Vec<&str> = results
        .iter()
        .filter(|r| !r.outcome.passed())
        .map(|r| r.name.as_str())
        .collect();
    println!(
        "{} test(s): {} passed, {} failed",
        results.len(),
        results.len() - failed.len(),
        failed.len()
    );
    if failed.is_empty() {
        Ok(())
    } else {
        anyhow::bail!(
            "Tests failed: {}\nhint: each failed lab is saved as a snapshot `failed-<test>-<time>`; `farm snapshot ls` lists them",
            failed.join(", ")
        )
    }
}
