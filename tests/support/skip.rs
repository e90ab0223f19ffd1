//! Test helper: an environment-dependent check that cannot run here fails with its reason
//! unless skips were asked for. Include it with `#[path = "support/skip.rs"] mod skip;`.

/// Whether a test must stop here because this machine lacks something it needs (`why`). A skip
/// is allowed only when asked for (`HORCRUX_ALLOW_SKIP=1`, said on stdout); otherwise the test
/// fails with the reason, so a run never passes a check it did not make.
pub fn skip_allowed(why: &str) -> bool {
    if std::env::var_os("HORCRUX_ALLOW_SKIP").is_some_and(|v| v == "1") {
        println!("SKIP (HORCRUX_ALLOW_SKIP=1): {why}");
        return true;
    }
    panic!("{why}; set HORCRUX_ALLOW_SKIP=1 to skip this check");
}
