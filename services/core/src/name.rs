//! Repository names and tags, by the distribution spec's grammar.

/// Longest repository name Berth accepts; clients put the host in front and many tools cap the
/// whole reference at 255 characters.
pub const MAX_NAME_LEN: usize = 255;

/// Whether `name` is a valid repository name:
/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*`.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= MAX_NAME_LEN && name.split('/').all(valid_component)
}

fn valid_component(c: &str) -> bool {
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        // A separator run: '.', '_', '__' or one or more '-', always followed by alnum.
        let start = i;
        match b[i] {
            b'.' => i += 1,
            b'_' => {
                i += 1;
                if i < b.len() && b[i] == b'_' {
                    i += 1;
                }
            }
            b'-' => {
                while i < b.len() && b[i] == b'-' {
                    i += 1;
                }
            }
            _ => return false,
        }
        if i == start || i >= b.len() || !alnum(b[i]) {
            return false;
        }
    }
    true
}

/// Whether `tag` is a valid tag: `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`.
pub fn valid_tag(tag: &str) -> bool {
    let b = tag.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b[1..].iter().all(|&x| x.is_ascii_alphanumeric() || x == b'.' || x == b'_' || x == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["a", "library/ubuntu", "my-org/my_app/sub.x", "a__b", "a---b/c", "0/1/2"] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in
            ["", "A", "Library/ubuntu", "a/", "/a", "a//b", "a___b", "-a", "a-", "a.", "a..b", "a_-b", "a b", "ä"]
        {
            assert!(!valid_name(bad), "{bad}");
        }
        assert!(!valid_name(&"a".repeat(MAX_NAME_LEN + 1)));
    }

    #[test]
    fn tags() {
        for ok in ["latest", "v1.0.0", "_x", "A-b_c.d", &"a".repeat(128)] {
            assert!(valid_tag(ok), "{ok}");
        }
        for bad in ["", ".a", "-a", "a/b", "a:b", &"a".repeat(129)] {
            assert!(!valid_tag(bad), "{bad}");
        }
    }

    proptest::proptest! {
        #[test]
        fn generated_names_are_valid(s in "[a-z0-9]{1,5}(([._]|__|-{1,3})[a-z0-9]{1,5}){0,3}(/[a-z0-9]{1,5}(([._]|__|-{1,3})[a-z0-9]{1,5}){0,3}){0,3}") {
            proptest::prop_assert!(valid_name(&s));
        }

        #[test]
        fn never_panics(s in ".{0,300}") {
            let _ = valid_name(&s);
            let _ = valid_tag(&s);
        }
    }
}
