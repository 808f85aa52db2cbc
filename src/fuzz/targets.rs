//! The fuzz targets: each parser farm runs on bytes it did not write, with real examples
//! of its format to start from.

use super::Target;
use crate::model::build::cache_record::{Blob, CacheRecord, SnapshotRecord};
use crate::model::hash::{ContentHash, DrvHash};
use crate::model::signing::{SecretKey, verify};

/// Every target, in a fixed order.
pub fn targets() -> Vec<Target> {
    vec![
        Target {
            name: "qcow2_header",
            seeds: qcow2_seeds,
            dictionary: &[b"QFI\xfb", b"\xe2\x79\x2a\xca", b"qcow2", b"../base.qcow2"],
            run: |input| {
                let _ = crate::store::qcow2::parse_header(input);
            },
        },
        Target {
            name: "cache_record",
            seeds: cache_record_seeds,
            dictionary: JSON_TOKENS,
            run: |input| {
                if let Ok(record) = CacheRecord::from_json(input) {
                    // What `record_by_hash` does next with a record it read.
                    let key = fuzz_key();
                    let _ = verify(&[key.public()], &record.signed_bytes(), &record.signatures);
                    let _ = crate::model::build::derivation::hash_of_json(&record.derivation);
                    let _ = record.download_size();
                }
            },
        },
        Target {
            name: "snapshot_record",
            seeds: snapshot_record_seeds,
            dictionary: JSON_TOKENS,
            run: |input| {
                if let Ok(record) = SnapshotRecord::from_json(input) {
                    let key = fuzz_key();
                    let _ = verify(&[key.public()], &record.signed_bytes(), &record.signatures);
                }
            },
        },
        Target {
            name: "archive_manifest",
            seeds: manifest_seeds,
            dictionary: JSON_TOKENS,
            run: |input| {
                let _ = crate::store::Manifest::parse(input);
            },
        },
        Target {
            name: "site_observation",
            seeds: observation_seeds,
            dictionary: &[
                b"missing ",
                b"vm ",
                b"record ",
                b"entry ",
                b"netpid ",
                b"listen ",
                b"arch ",
                b"\0/proc/",
                b"/environ:FARM_PROJECT=",
                b"FARM_PROCESS=vm:",
                b"net:lab:switch",
            ],
            run: |input| {
                let text = String::from_utf8_lossy(input);
                let obs = crate::model::lab::observation::parse_observation(&text, "/p/.farm");
                let _ = obs.orphans();
            },
        },
        Target {
            name: "instance_record",
            seeds: instance_record_seeds,
            dictionary: JSON_TOKENS,
            run: |input| {
                let _ = crate::model::lab::instance::InstanceRecord::parse(input);
            },
        },
        Target {
            name: "qmp_answer",
            seeds: || {
                lines(&[
                    r#"{"return": {}}"#,
                    r#"{"return": {"status": "completed", "total-time": 812}}"#,
                    r#"{"error": {"class": "GenericError", "desc": "No such device"}}"#,
                    r#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "STOP"}"#,
                    r#"{"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}}, "capabilities": []}}"#,
                ])
            },
            dictionary: JSON_TOKENS,
            run: |input| {
                let _ = crate::sys::qmp::answer_of(&String::from_utf8_lossy(input));
            },
        },
        Target {
            name: "wirefilter_answer",
            seeds: || {
                lines(&[
                    "0000 DATA END WITH '.'\nDelay 100 ms\n.\n1000 Success\n",
                    "1000 Success\n",
                    "1500 Invalid argument\n",
                ])
            },
            dictionary: &[b"0000 ", b"1000 ", b"\n.\n", b"1500 "],
            run: |input| {
                let _ = crate::sys::wirefilter::parse_answer(&String::from_utf8_lossy(input));
            },
        },
        Target {
            name: "console_panic",
            seeds: || {
                lines(&[
                    "[    1.234] Kernel panic - not syncing: VFS: Unable to mount root fs on unknown-block(0,0)\n[    1.235] ---[ end Kernel panic - not syncing: VFS ]---\n",
                    "Debian GNU/Linux 12 debian ttyS0\n\ndebian login: ",
                    "farm-seed: applying seed from /dev/vdb\ncloud-init[170]: finished\n",
                ])
            },
            dictionary: &[
                b"Kernel panic - not syncing",
                b"---[ end ",
                b" login: ",
                b"cloud-init",
                b"farm-seed",
            ],
            run: |input| {
                let text = String::from_utf8_lossy(input);
                let _ = crate::model::build::kernel_panic::kernel_panic(&text);
                let _ = crate::model::build::first_boot::read_console(&text);
            },
        },
        Target {
            name: "cloud_init_status",
            seeds: || {
                lines(&[
                    "\nstatus: done\ntime: Sat, 28 Nov 2026 15:00:00 +0000\ndetail:\nDataSourceNoCloud [seed=/dev/vdb]\nfarm: cloud-init.log\n2026 ... finished\n",
                    "status: running\nfarm: cloud-init.log\n",
                    "......\nstatus: error\ntime: x\ndetail:\n('locale', ProcessExecutionError(...))\nfarm: cloud-init.log\nline one\n",
                    "farm: no cloud-init\n",
                ])
            },
            dictionary: &[
                b"status: ",
                b"farm: cloud-init.log",
                b"farm: no cloud-init",
                b"degraded",
            ],
            run: |input| {
                let _ = crate::model::build::first_boot::parse_wait_output(
                    &String::from_utf8_lossy(input),
                );
            },
        },
        Target {
            name: "farm_lock",
            seeds: || {
                lines(&[concat!(
                    "# farm.lock\nversion = 1\n\n[derivations.cloud]\n",
                    "drv = \"blake3-901ffd43c1241eaa690f408976d167b2c7b1e07d4295b47e105c007ea255edcd\"\n",
                    "output = \"blake3-1e0e885907a12734972aca98b20e1c698e4fd21470cf8016095ce4c64741d30f\"\n\n",
                    "[derivations.cloud.inputs]\nformat = \"03f88b99c3d8073b\"\nhash = \"a25e12732d2a24e8\"\n",
                )])
            },
            dictionary: &[
                b"[derivations.",
                b"drv = ",
                b"blake3-",
                b"version = ",
                b"\"\"\"",
                b"[[",
                b"inf",
            ],
            run: |input| {
                let _ = crate::model::build::lock::parse(&String::from_utf8_lossy(input));
            },
        },
        Target {
            name: "freed_memory",
            seeds: || lines(&["524288 1\n", "0 0\n", "-12 1\n"]),
            dictionary: &[b" 1", b" 0", b"-"],
            run: |input| {
                let _ =
                    crate::run::snapshot::free_memory::parse_freed(&String::from_utf8_lossy(input));
            },
        },
    ]
}

const JSON_TOKENS: &[&[u8]] = &[
    b"\"format\": 1",
    b"\"files\": {",
    b"\"disk.qcow2\"",
    b"\"../x\"",
    b"\"blake3-",
    b"\"signatures\": [",
    b"\"entries\": [",
    b"\"name\": \"",
    b"\\u0000",
    b"1e400",
    b"-0",
    b"[[[[[[[[[[[[[[[[",
];

fn lines(samples: &[&str]) -> Vec<Vec<u8>> {
    samples.iter().map(|s| s.as_bytes().to_vec()).collect()
}

fn fuzz_key() -> SecretKey {
    SecretKey::from_seed("fuzz", [7; 32]).expect("a valid key name")
}

/// A version 3 header with a backing file name and its format extension, as qemu-img
/// writes one (`qemu-img create -f qcow2 -F qcow2 -b base.qcow2`), and a version 2 header.
fn qcow2_seeds() -> Vec<Vec<u8>> {
    let v3 = {
        let mut h = vec![0u8; 512];
        h[..4].copy_from_slice(b"QFI\xfb");
        h[4..8].copy_from_slice(&3u32.to_be_bytes());
        let backing = b"base.qcow2";
        let backing_at = 104 + 8 + 8 + 8; // after the format extension and the end marker
        h[8..16].copy_from_slice(&(backing_at as u64).to_be_bytes());
        h[16..20].copy_from_slice(&(backing.len() as u32).to_be_bytes());
        h[20..24].copy_from_slice(&16u32.to_be_bytes());
        h[24..32].copy_from_slice(&(1u64 << 30).to_be_bytes());
        h[96..100].copy_from_slice(&4u32.to_be_bytes());
        h[100..104].copy_from_slice(&104u32.to_be_bytes());
        h[104..108].copy_from_slice(&0xe279_2acau32.to_be_bytes());
        h[108..112].copy_from_slice(&5u32.to_be_bytes());
        h[112..117].copy_from_slice(b"qcow2");
        // 120..128: the end marker (zeros).
        h[backing_at..backing_at + backing.len()].copy_from_slice(backing);
        h
    };
    let v2 = {
        let mut h = vec![0u8; 128];
        h[..4].copy_from_slice(b"QFI\xfb");
        h[4..8].copy_from_slice(&2u32.to_be_bytes());
        h[20..24].copy_from_slice(&9u32.to_be_bytes());
        h[24..32].copy_from_slice(&(64u64 << 20).to_be_bytes());
        h
    };
    vec![v3, v2]
}

fn cache_record_seeds() -> Vec<Vec<u8>> {
    let blob = |n: u8| Blob {
        blake3: ContentHash([n; 32]),
        size: 1 << 20,
        zstd_size: 1 << 18,
    };
    let derivation = serde_json::json!({"type": "layer", "format": 9, "parent": "x", "steps": []});
    let mut record = CacheRecord {
        format: crate::model::build::cache_record::CACHE_FORMAT,
        drv_hash: crate::model::build::derivation::hash_of_json(&derivation),
        name: "web_amd64".into(),
        derivation,
        parent: Some(DrvHash([1; 32])),
        parent_dir: Some("0101-debian".into()),
        parent_output: Some(ContentHash([2; 32])),
        files: [
            ("disk.qcow2".to_string(), blob(3)),
            ("boot/vmlinuz".to_string(), blob(4)),
        ]
        .into_iter()
        .collect(),
        signatures: Vec::new(),
    };
    record
        .signatures
        .push(fuzz_key().sign(&record.signed_bytes()));
    vec![serde_json::to_vec_pretty(&record).expect("records encode")]
}

fn snapshot_record_seeds() -> Vec<Vec<u8>> {
    let mut record = SnapshotRecord {
        format: crate::model::build::cache_record::CACHE_FORMAT,
        name: "converged".into(),
        created: 1_796_531_192,
        entries: vec![DrvHash([5; 32]), DrvHash([6; 32])],
        vms: vec!["debian_vs_amd64".into(), "debian_vs_vde_amd64".into()],
        converged_key: Some("abc".into()),
        signatures: Vec::new(),
    };
    record
        .signatures
        .push(fuzz_key().sign(&record.signed_bytes()));
    vec![serde_json::to_vec(&record).expect("records encode")]
}

fn manifest_seeds() -> Vec<Vec<u8>> {
    let hash = ContentHash([9; 32]);
    vec![
        format!(
            "{{\"format\": 1, \"entries\": [{{\"dir\": \"{dir}\", \"files\": {{\
             \"disk.qcow2\": {{\"blake3\": \"{hash}\", \"size\": 1048576}}, \
             \"meta.json\": {{\"blake3\": \"{hash}\", \"size\": 900}}}}}}]}}",
            dir = crate::store::entry_dir_name(&DrvHash([8; 32]), "debian"),
        )
        .into_bytes(),
    ]
}

fn observation_seeds() -> Vec<Vec<u8>> {
    let record = instance_record_seeds().remove(0);
    vec![
        format!(
            "missing b3sum\nzstd\nkvm-device\narch x86_64\nlisten 0100007F:089A\nlisten 00000000:0016\n\
             vm web 4242\nrecord web {}\nvm half 5\nvm old -\nrecord old {{\"name\":\"old\"}}\n\
             /proc/4242/environ:FARM_PROJECT=/p/.farm\0/proc/4242/environ:FARM_PROCESS=vm:web\0\
             /proc/7/environ:FARM_PROJECT=/p/.farm\0/proc/7/environ:FARM_PROCESS=net:lab:switch\0\n\
             entry k-a\nnetpid lab switch 7\nnetpid lab tap 8\n",
            String::from_utf8_lossy(&record)
        )
        .into_bytes(),
    ]
}

/// A record as `farm up` writes one (`instance.json`, the instance tests' VM).
fn instance_record_seeds() -> Vec<Vec<u8>> {
    vec![include_bytes!("seeds/instance-record.json").to_vec()]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Inputs made from seeds go deep only if the seeds themselves are read whole.
    #[test]
    fn every_seed_is_a_valid_example_of_its_format() {
        let qcow2 = qcow2_seeds();
        let v3 = crate::store::qcow2::parse_header(&qcow2[0])
            .unwrap()
            .unwrap();
        assert_eq!(v3.backing.as_deref(), Some("base.qcow2"));
        assert_eq!(v3.backing_format.as_deref(), Some("qcow2"));
        assert!(
            crate::store::qcow2::parse_header(&qcow2[1])
                .unwrap()
                .is_some()
        );
        let record = CacheRecord::from_json(&cache_record_seeds()[0]).unwrap();
        let key = fuzz_key();
        verify(&[key.public()], &record.signed_bytes(), &record.signatures).unwrap();
        SnapshotRecord::from_json(&snapshot_record_seeds()[0]).unwrap();
        crate::store::Manifest::parse(&manifest_seeds()[0]).unwrap();
        crate::model::lab::instance::InstanceRecord::parse(&instance_record_seeds()[0]).unwrap();
        let obs = crate::model::lab::observation::parse_observation(
            &String::from_utf8_lossy(&observation_seeds()[0]),
            "/p/.farm",
        );
        assert!(obs.facts.zstd);
        for target in targets() {
            for seed in (target.seeds)() {
                (target.run)(&seed);
            }
        }
    }
}
