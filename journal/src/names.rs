//! Names that come from a command line or the network and become file names in the store:
//! groups (directories) and volumes (image files). One alphabet and one length limit for both,
//! checked at every entry point, so no name can leave its directory.

/// Longest group or volume name.
pub const MAX_NAME_LEN: usize = 128;
/// Most volumes one group may have.
pub const MAX_VOLUMES: usize = 64;

/// Why `name` cannot be a group or volume name; `what` says which ("group", "volume").
pub fn check(what: &str, name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err(format!("a {what} name may not be empty"));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(format!(
            "{what} name {:?}… is {} bytes long; at most {MAX_NAME_LEN} are allowed",
            name.chars().take(16).collect::<String>(),
            name.len()
        ));
    }
    if name.starts_with('.') {
        return Err(format!("{what} name {name:?} may not start with '.'"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(format!(
            "{what} name {name:?} holds {c:?}; use letters, digits, '-', '_' and '.'"
        ));
    }
    Ok(())
}

pub fn valid(name: &str) -> bool {
    check("", name).is_ok()
}

/// Checks a group's volume names: each valid, none twice, 1 to [`MAX_VOLUMES`] of them.
pub fn check_volumes<'a>(names: impl IntoIterator<Item = &'a str>) -> Result<(), String> {
    let names: Vec<&str> = names.into_iter().collect();
    if names.is_empty() || names.len() > MAX_VOLUMES {
        return Err(format!(
            "a group needs 1 to {MAX_VOLUMES} volumes, not {}",
            names.len()
        ));
    }
    for (i, n) in names.iter().enumerate() {
        check("volume", n)?;
        if names[..i].contains(n) {
            return Err(format!("volume name {n:?} is given twice"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn safe_names_only() {
        assert!(valid("web-01.prod_a"));
        for bad in [
            "",
            "..",
            ".hidden",
            "a/b",
            "../../../outside/precious",
            "x y",
            "nul\0",
            "é",
            &"a".repeat(MAX_NAME_LEN + 1),
        ] {
            assert!(!valid(bad), "{bad:?}");
        }
        assert!(check_volumes(["root", "data"]).is_ok());
        assert!(check_volumes(["root", "root"])
            .unwrap_err()
            .contains("twice"));
        assert!(check_volumes([]).is_err());
        assert!(check_volumes(["ok", "../x"]).is_err());
    }
}
