//! What `scripts/fuzz.sh` gives libFuzzer for a target of `farm::fuzz`: its seeds as a
//! corpus directory and its tokens as a dictionary, so both fuzzers start from the same
//! real examples of each format.
//!
//! `cargo run --example fuzz_seeds -- --list` names the targets;
//! `cargo run --example fuzz_seeds -- TARGET CORPUS_DIR DICT_FILE` writes them;
//! `cargo run --example fuzz_seeds -- --max-len` prints the longest input the targets take.

use std::fmt::Write as _;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let targets = farm::fuzz::targets();
    match args.as_slice() {
        [flag] if flag == "--list" => {
            for target in &targets {
                println!("{}", target.name);
            }
        }
        [flag] if flag == "--max-len" => println!("{}", farm::fuzz::MAX_INPUT),
        [name, corpus, dict] => {
            let Some(target) = targets.iter().find(|t| t.name == name) else {
                eprintln!("error: no fuzz target `{name}` (see --list)");
                std::process::exit(2);
            };
            fs_err::create_dir_all(corpus).unwrap();
            for (i, seed) in (target.seeds)().iter().enumerate() {
                fs_err::write(format!("{corpus}/seed-{i}"), seed).unwrap();
            }
            // libFuzzer's dictionary: one quoted token per line, bytes outside printable
            // ASCII (and the quote and backslash) as \xNN.
            let mut text = String::new();
            for token in target.dictionary {
                text.push('"');
                for &b in *token {
                    match b {
                        b' '..=b'~' if b != b'"' && b != b'\\' => text.push(b as char),
                        _ => write!(text, "\\x{b:02x}").unwrap(),
                    }
                }
                text.push_str("\"\n");
            }
            if let Some(parent) = std::path::Path::new(dict).parent() {
                fs_err::create_dir_all(parent).unwrap();
            }
            fs_err::write(dict, text).unwrap();
        }
        _ => {
            eprintln!("usage: fuzz_seeds --list | --max-len | TARGET CORPUS_DIR DICT_FILE");
            std::process::exit(2);
        }
    }
}
