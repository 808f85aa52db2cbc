//! Reading a VM's serial console for a kernel panic. To farm, a panicked guest is a VM that
//! stopped answering: its qemu ends when the guest reports the panic through its panic
//! device (`model::qemu`), or keeps running a dead machine when it cannot (Linux waits
//! forever after a panic unless told to reboot). Its console says what happened.

/// How far around the panic line the oops that led to it, and the panic's own stack dump
/// after it, are looked for.
const OOPS_WINDOW: usize = 80;

/// The lines of an oops worth an error message: what went wrong, in which task, where.
const HEADLINES: [&str; 7] = [
    "BUG:",
    "Oops",
    "sysrq: ",
    "Comm: ",
    "RIP: ",
    "stack guard page",
    "Kernel panic - not syncing",
];

/// The panic and the headlines of the oops that led to it, when `console` shows the kernel
/// panicked. Only the last boot counts: a console that shows a boot after the panic (a
/// reboot) is not a dead machine.
pub fn kernel_panic(console: &str) -> Option<String> {
    let lines: Vec<&str> = console.lines().collect();
    // `---[ end Kernel panic …` repeats the panic line after its stack dump, when the
    // kernel got that far before its qemu ended.
    let last = lines
        .iter()
        .rposition(|l| l.contains("Kernel panic - not syncing") && !l.contains("---[ end "))?;
    let rebooted = lines[last..]
        .iter()
        .any(|l| l.contains("Linux version ") || l.contains("SeaBIOS"));
    if rebooted {
        return None;
    }
    let window = &lines[last.saturating_sub(OOPS_WINDOW)..lines.len().min(last + OOPS_WINDOW)];
    let mut excerpt: Vec<&str> = Vec::new();
    for line in window {
        let headline = HEADLINES.iter().any(|h| line.contains(h));
        if headline && !line.contains("---[ end ") && !excerpt.contains(line) {
            excerpt.push(line.trim_end());
        }
    }
    if excerpt.is_empty() {
        excerpt.push(lines[last].trim_end());
    }
    Some(excerpt.join("\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The console of a hypervisor VM seen here, whose kernel overflowed a stack in its
    /// KVM thread.
    const PANICKED: &str = include_str!("../../../tests/fixtures/consoles/kvm_stack_panic.log");

    #[test]
    fn a_panic_is_found_with_the_oops_that_led_to_it() {
        let excerpt = kernel_panic(PANICKED).expect("a panic");
        let lines: Vec<&str> = excerpt.lines().collect();
        assert!(lines[0].ends_with("BUG: TASK stack guard page was hit at 00000000097b60aa (stack is 0000000050bd55e7..0000000080f560dc)"), "{excerpt}");
        assert!(
            excerpt.contains("Comm: CPU 0/KVM") && excerpt.contains("RIP: 0010:asm_exc_page_fault")
        );
        assert!(lines.last().unwrap().ends_with(
            "Kernel panic - not syncing: corrupted stack end detected inside scheduler"
        ));
        assert!(
            !excerpt.contains("RAX:")
                && !excerpt.contains("Code:")
                && !excerpt.contains("---[ end")
        );
    }

    /// A panic through the panic device: qemu ended during the panic's own stack dump,
    /// before its `---[ end` line.
    #[test]
    fn the_panics_own_stack_dump_names_its_task() {
        let console = "[   49.58] sysrq: Trigger a crash
[   49.58] Kernel panic - not syncing: sysrq triggered crash
[   49.58] CPU: 0 PID: 784 Comm: sh Not tainted 6.1.0-50-cloud-amd64 #1  Debian 6.1.176-1
[   49.58] Call Trace:
[   49.58]  panic+0x118/0x2f4
[   49.58] RIP: 0033:0x7f22e3c1a350
[   49.58] RAX: ffffffffffffffda RBX: 0000000000000002
";
        assert_eq!(
            kernel_panic(console).unwrap(),
            "[   49.58] sysrq: Trigger a crash
[   49.58] Kernel panic - not syncing: sysrq triggered crash
[   49.58] CPU: 0 PID: 784 Comm: sh Not tainted 6.1.0-50-cloud-amd64 #1  Debian 6.1.176-1
[   49.58] RIP: 0033:0x7f22e3c1a350"
        );
    }

    #[test]
    fn a_console_without_a_panic_or_rebooted_since_has_none() {
        assert_eq!(
            kernel_panic("Debian GNU/Linux 12 hv ttyS0\nhv login:"),
            None
        );
        let rebooted =
            format!("{PANICKED}SeaBIOS (version 1.16.2)\n[    0.000000] Linux version 6.1.0\n");
        assert_eq!(kernel_panic(&rebooted), None);
    }

    #[test]
    fn a_panic_without_an_oops_is_its_own_line() {
        let console = "a\nb\n[    2.1] Kernel panic - not syncing: VFS: Unable to mount root fs\n[    2.1] ---[ end Kernel panic - not syncing: VFS: Unable to mount root fs ]---\n";
        assert_eq!(
            kernel_panic(console).unwrap(),
            "[    2.1] Kernel panic - not syncing: VFS: Unable to mount root fs"
        );
    }
}
