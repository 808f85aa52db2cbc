//! A project directory with a farm.toml, driven through the real `farm` binary.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// ansible-core's venv, made by `scripts/setup.sh`.
pub const ANSIBLE_BIN: &str = "/opt/farm-ansible/bin";

pub struct Project {
    dir: PathBuf,
    /// Removes `dir` when the project goes; `None` for a kept one (a shared lab's).
    _temp: Option<tempfile::TempDir>,
    /// The store: `cache/` in the project unless a shared one is given.
    pub store: PathBuf,
}

impl Project {
    pub fn new(farm_toml: &str) -> Self {
        let temp = tempfile::tempdir().unwrap();
        let dir = temp.path().to_path_buf();
        fs_err::write(dir.join("farm.toml"), farm_toml).unwrap();
        let store = dir.join("cache");
        Project {
            dir,
            _temp: Some(temp),
            store,
        }
    }

    /// A project kept at `dir` (made if missing) on `store`, its farm.toml written anew: a
    /// shared lab's, whose state directory must stay where its snapshot was saved.
    pub fn kept(dir: &Path, farm_toml: &str, store: &Path) -> Self {
        fs_err::create_dir_all(dir).unwrap();
        fs_err::write(dir.join("farm.toml"), farm_toml).unwrap();
        Project {
            dir: dir.to_path_buf(),
            _temp: None,
            store: store.to_path_buf(),
        }
    }

    /// A project whose store is `store` (shared between tests so images are built once).
    pub fn with_store(farm_toml: &str, store: &Path) -> Self {
        let mut project = Project::new(farm_toml);
        project.store = store.to_path_buf();
        project
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    pub fn write(&self, relative: &str, contents: &str) {
        let path = self.path().join(relative);
        if let Some(parent) = path.parent() {
            fs_err::create_dir_all(parent).unwrap();
        }
        fs_err::write(path, contents).unwrap();
    }

    /// An empty 16 MiB qcow2 at `relative`: an image with nothing to boot.
    pub fn blank_disk(&self, relative: &str) {
        let status = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(self.path().join(relative))
            .arg("16M")
            .status()
            .unwrap();
        assert!(status.success(), "qemu-img create {relative}");
    }

    /// The lab as a Rust test drives it (`farm::testing`): the same store and state.
    pub fn lab(&self) -> farm::testing::Lab {
        farm::testing::Lab::open(&self.path().join("farm.toml"), Some(&self.store))
            .unwrap_or_else(|e| panic!("{}", farm::model::text::error_chain(&e)))
    }

    pub fn farm(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_farm"));
        cmd.current_dir(self.path())
            .args(args)
            .env("FARM_STORE", &self.store);
        cmd
    }

    /// farm with ansible-core (from `scripts/setup.sh`) first on its PATH.
    pub fn farm_with_ansible(&self, args: &[&str]) -> Command {
        let ansible = Path::new(ANSIBLE_BIN);
        assert!(
            ansible.join("ansible-playbook").exists(),
            "`{}` is missing; run ./scripts/setup.sh",
            ansible.join("ansible-playbook").display()
        );
        let mut cmd = self.farm(args);
        cmd.env(
            "PATH",
            format!(
                "{ANSIBLE_BIN}:{}",
                std::env::var("PATH").unwrap_or_default()
            ),
        );
        cmd
    }

    /// [`Project::farm_with_ansible`], failing the test, with its output, unless it succeeds.
    pub fn ok_with_ansible(&self, args: &[&str]) -> Output {
        let out = self.farm_with_ansible(args).output().unwrap();
        assert!(out.status.success(), "farm {args:?}\n{}", text(&out));
        out
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.farm(args).output().unwrap()
    }

    /// Runs farm and fails the test, with its output, unless it succeeds.
    pub fn ok(&self, args: &[&str]) -> Output {
        let out = self.run(args);
        assert!(out.status.success(), "farm {args:?}\n{}", text(&out));
        out
    }

    /// `farm status --json`'s row for `vm`.
    pub fn status_of(&self, vm: &str) -> serde_json::Value {
        let rows: serde_json::Value =
            serde_json::from_slice(&self.ok(&["status", "--json"]).stdout).unwrap();
        rows.as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == vm)
            .unwrap_or_else(|| panic!("no status row for `{vm}`: {rows}"))
            .clone()
    }

    /// The state `farm status` gives `vm` (running, stopped, missing, …).
    pub fn state_of(&self, vm: &str) -> String {
        self.status_of(vm)["state"].as_str().unwrap().to_string()
    }

    /// Directory names of the finished store entries.
    pub fn entries(&self) -> Vec<String> {
        list(&self.store.join("store"))
    }

    /// The store entry of `name` as this project's farm.toml derives it (`farm show`), so
    /// tests sharing a store find their own entry, not another test's of the same name.
    pub fn entry(&self, name: &str) -> PathBuf {
        self.in_store(name)
            .unwrap_or_else(|| panic!("`{name}` is not in the store"))
    }

    /// [`Project::entry`], or `None` when the store does not hold this derivation (another
    /// of the same name may be there: the store is shared and kept between runs).
    pub fn in_store(&self, name: &str) -> Option<PathBuf> {
        let out = self.ok(&["show", "--json", name]);
        let shown: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        shown[0]["in_store"].as_str().map(PathBuf::from)
    }
}

/// A value new on every call, for a derivation the store (kept between runs) must not have.
pub fn nonce() -> String {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
        .to_string()
}

pub fn list(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = match fs_err::read_dir(dir) {
        Ok(rd) => rd
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => Vec::new(),
    };
    names.sort();
    names
}

/// What the command printed on stdout.
pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// What the command printed on stderr (farm's log).
pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

pub fn text(out: &Output) -> String {
    format!(
        "status: {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A test that fails half-way must not leave VMs running: whatever `farm up` started in this
/// project is brought down when the project goes away.
impl Drop for Project {
    fn drop(&mut self) {
        let vms = self.path().join(".farm/vms");
        if !list(&vms).is_empty() {
            // At once: what runs now is a failed test's leftover or a lab whose snapshot
            // keeps its moment; nothing needs a clean power-off.
            let _ = self.farm(&["down", "--timeout", "0"]).output();
        }
    }
}
