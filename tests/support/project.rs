//! A project directory with a farm.toml, driven through the real `farm` binary.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub struct Project {
    pub dir: tempfile::TempDir,
    /// The store: `cache/` in the project unless a shared one is given.
    pub store: PathBuf,
}

impl Project {
    pub fn new(farm_toml: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        fs_err::write(dir.path().join("farm.toml"), farm_toml).unwrap();
        let store = dir.path().join("cache");
        Project { dir, store }
    }

    /// A project whose store is `store` (shared between tests so images are built once).
    pub fn with_store(farm_toml: &str, store: &Path) -> Self {
        let mut project = Project::new(farm_toml);
        project.store = store.to_path_buf();
        project
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
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

    pub fn farm(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_farm"));
        cmd.current_dir(self.path())
            .args(args)
            .env("FARM_STORE", &self.store);
        cmd
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
        let out = self.ok(&["show", "--json", name]);
        let shown: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let path = shown[0]["in_store"]
            .as_str()
            .unwrap_or_else(|| panic!("`{name}` is not in the store: {shown}"));
        PathBuf::from(path)
    }
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
            let _ = self.farm(&["down"]).output();
        }
    }
}
