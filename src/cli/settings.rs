//! One declaration per setting. `settings!` turns a list of settings into
//! the three things each needs: a clap flag (with its help and default), a
//! key of the TOML file's section, and a field of the resolved settings
//! (flag over file over default); plus `to_args`, which hands the flags
//! given on to `rotor up`'s children. Adding a setting is one line in a
//! `settings!` block plus its use.
//!
//! A setting is `name: Option<T>` (one value) or `name: Vec<T>` (repeatable;
//! flags replace the file's list as a whole), optionally `= "default"`
//! written as on the command line (so `--help` shows the very text that is
//! parsed). Without a default an `Option` resolves to an `Option` and the
//! use decides. `T` is any [`Value`].

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// A setting's value type: read from a flag's text, a file's key or a
/// default's text, and written back for `rotor up`'s children.
pub trait Value: Sized + Clone + Send + Sync + 'static {
    /// What `--help` calls it.
    const NAME: &'static str;
    /// Values a flag takes: a switch (`--no-auth`) may take none.
    const NUM_ARGS: std::ops::RangeInclusive<usize> = 1..=1;
    /// The value of a switch given without one.
    const MISSING: Option<&'static str> = None;
    /// Whether a TOML number may stand for the value (read as its decimal
    /// text): not for one written in another base, such as a file mode.
    const FROM_NUMBER: bool = true;
    fn parse(s: &str) -> Result<Self, String>;
    fn show(&self) -> String;
}

/// The longest duration a setting takes: 10 years as humantime counts
/// them (365.25 days each), so `10y` is one.
const MAX_DURATION: Duration = Duration::from_secs(10 * 31_557_600);

impl Value for Duration {
    const NAME: &'static str = "DURATION";
    fn parse(s: &str) -> Result<Self, String> {
        if s.starts_with('-') {
            return Err(format!("`{s}`: a duration is not negative"));
        }
        let d = humantime::parse_duration(s)
            .map_err(|_| format!("`{s}` is not a duration (e.g. 500ms, 20s, 1m)"))?;
        // Every deadline is now + a duration: one past what a clock
        // instant holds (`500000000000y`) would panic on the first request.
        match d <= MAX_DURATION {
            true => Ok(d),
            false => Err(format!(
                "`{s}` is longer than any duration here needs (at most 10 years)"
            )),
        }
    }
    fn show(&self) -> String {
        humantime::format_duration(*self).to_string()
    }
}

impl Value for bool {
    const NAME: &'static str = "BOOL";
    const NUM_ARGS: std::ops::RangeInclusive<usize> = 0..=1;
    const MISSING: Option<&'static str> = Some("true");
    fn parse(s: &str) -> Result<Self, String> {
        s.parse().map_err(|_| format!("`{s}` is not true or false"))
    }
    fn show(&self) -> String {
        self.to_string()
    }
}

impl Value for PathBuf {
    const NAME: &'static str = "PATH";
    fn parse(s: &str) -> Result<Self, String> {
        Ok(PathBuf::from(s))
    }
    fn show(&self) -> String {
        self.display().to_string()
    }
}

impl Value for String {
    const NAME: &'static str = "TEXT";
    fn parse(s: &str) -> Result<Self, String> {
        Ok(s.to_string())
    }
    fn show(&self) -> String {
        self.clone()
    }
}

impl Value for SocketAddr {
    const NAME: &'static str = "ADDR";
    fn parse(s: &str) -> Result<Self, String> {
        s.parse().map_err(|_| {
            format!("`{s}` is not an address with a port (127.0.0.1:8080, [::1]:8080)")
        })
    }
    fn show(&self) -> String {
        self.to_string()
    }
}

macro_rules! number_values {
    ($($t:ty),*) => {$(
        impl Value for $t {
            const NAME: &'static str = "N";
            fn parse(s: &str) -> Result<Self, String> {
                if s.starts_with('-') {
                    return Err(format!("`{s}`: a number here is 0 or more"));
                }
                s.parse().map_err(|e| match s.contains(',') {
                    // A list's default is shown comma-separated
                    // (`--deny-port` 25,465,587); it is given a value a
                    // flag.
                    true => format!("`{s}`: one number a flag (repeat the flag for more)"),
                    false => format!("`{s}`: {e}"),
                })
            }
            fn show(&self) -> String {
                self.to_string()
            }
        }
    )*};
}
number_values!(u8, u16, u32, u64, usize);

/// A flag's help: its doc lines, then the default that the declaration
/// gives (the very text that is parsed for it).
pub fn help(doc: &[&str], default: Option<&str>) -> String {
    let joined = doc.iter().map(|l| l.trim()).collect::<Vec<_>>().join(" ");
    // As clap does with a one-paragraph doc comment.
    let mut text = joined.strip_suffix('.').unwrap_or(&joined).to_string();
    if let Some(d) = default {
        text.push_str(&format!(" [default: {d}]"));
    }
    text
}

/// The flag text of a field name: `lease_timeout` → `--lease-timeout`.
pub fn flag(name: &str) -> String {
    format!("--{}", name.replace('_', "-"))
}

/// How a setting of each shape (one value, a list) merges and is passed
/// on.
pub trait Shape: Sized + Clone {
    type Item: Value;
    /// What was given: the flags if any, else the file's key if present
    /// (a list given as flags replaces the file's as a whole; an empty list
    /// in the file is a list given).
    fn given(flag: &Self, file: &Option<Self>) -> Option<Self>;
    fn to_args(&self, name: &str, out: &mut Vec<OsString>);
    /// The default's text: one value, or a comma list.
    fn default(text: &str) -> Self;
}

impl<T: Value> Shape for Option<T> {
    type Item = T;
    fn given(flag: &Self, file: &Option<Self>) -> Option<Self> {
        match flag {
            Some(_) => Some(flag.clone()),
            None => file.clone(),
        }
    }
    fn to_args(&self, name: &str, out: &mut Vec<OsString>) {
        if let Some(v) = self {
            out.push(format!("{}={}", flag(name), v.show()).into());
        }
    }
    fn default(text: &str) -> Self {
        Some(T::parse(text).unwrap_or_else(|e| panic!("default of {text}: {e}")))
    }
}

impl<T: Value> Shape for Vec<T> {
    type Item = T;
    fn given(flag: &Self, file: &Option<Self>) -> Option<Self> {
        match flag.is_empty() {
            false => Some(flag.clone()),
            true => file.clone(),
        }
    }
    fn to_args(&self, name: &str, out: &mut Vec<OsString>) {
        for v in self {
            out.push(format!("{}={}", flag(name), v.show()).into());
        }
    }
    fn default(text: &str) -> Self {
        text.split(',')
            .filter(|s| !s.is_empty())
            .map(|s| T::parse(s).unwrap_or_else(|e| panic!("default of {text}: {e}")))
            .collect()
    }
}

/// A value as TOML writes it: text, a number or a boolean, read through
/// the same `Value::parse` as the flag.
enum Raw {
    Bool(bool),
    Int(i64),
    Text(String),
}

impl<'de> serde::Deserialize<'de> for Raw {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Raw, D::Error> {
        struct Visit;
        impl serde::de::Visitor<'_> for Visit {
            type Value = Raw;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                // What a wrong type (a float, a list, a table) is told.
                f.write_str("a string (as the flag takes it), a whole number or true/false")
            }
            fn visit_bool<E>(self, v: bool) -> Result<Raw, E> {
                Ok(Raw::Bool(v))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Raw, E> {
                Ok(Raw::Int(v))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Raw, E> {
                i64::try_from(v)
                    .map(Raw::Int)
                    .map_err(|_| E::custom(format!("{v} is too large")))
            }
            fn visit_str<E>(self, v: &str) -> Result<Raw, E> {
                Ok(Raw::Text(v.to_string()))
            }
            fn visit_string<E>(self, v: String) -> Result<Raw, E> {
                Ok(Raw::Text(v))
            }
        }
        d.deserialize_any(Visit)
    }
}

impl Raw {
    fn value<T: Value, E: serde::de::Error>(self) -> Result<T, E> {
        let text = match self {
            Raw::Bool(b) => b.to_string(),
            Raw::Int(_) if !T::FROM_NUMBER => {
                return Err(E::custom(format!(
                    "write this {} as a string (e.g. \"660\"): a TOML number is not read as octal",
                    T::NAME
                )))
            }
            Raw::Int(i) => i.to_string(),
            Raw::Text(s) => s,
        };
        T::parse(&text).map_err(E::custom)
    }
}

/// Reads a file key of either shape (`deserialize_with`).
pub fn de<'de, D, S>(d: D) -> Result<Option<S>, D::Error>
where
    D: serde::Deserializer<'de>,
    S: FromFile,
{
    S::from_file(d).map(Some)
}

pub trait FromFile: Sized {
    fn from_file<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error>;
}

impl<T: Value> FromFile for Option<T> {
    fn from_file<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw: Raw = serde::Deserialize::deserialize(d)?;
        raw.value().map(Some)
    }
}

impl<T: Value> FromFile for Vec<T> {
    fn from_file<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw: Vec<Raw> = serde::Deserialize::deserialize(d)?;
        raw.into_iter().map(Raw::value).collect()
    }
}

/// The resolved type of a setting: a default makes an `Option` a plain
/// value.
macro_rules! resolved_type {
    (Option<$t:ty> = $d:literal) => { $t };
    (Option<$t:ty>) => { Option<$t> };
    (Vec<$t:ty> $(= $d:literal)?) => { Vec<$t> };
}

macro_rules! resolve_value {
    (Option, $v:expr, $d:literal) => {
        $v.unwrap_or_else(|| $crate::cli::settings::Shape::default($d))
            .expect("a value")
    };
    (Vec, $v:expr, $d:literal) => {
        $v.unwrap_or_else(|| $crate::cli::settings::Shape::default($d))
    };
    ($shape:ident, $v:expr,) => {
        $v.unwrap_or_default()
    };
}

/// Declares a section of settings:
///
/// ```ignore
/// settings! {
///     /// The flags.
///     pub struct Flags, file FileSection, resolved Resolved {
///         /// Help for the flag.
///         lease_timeout: Option<Duration> = "2s",
///         #[arg(value_name = "CIDR")]
///         allow_destination: Vec<String>,
///     }
/// }
/// ```
///
/// `#[arg(...)]` attributes go to the flag only (they come after the
/// generated ones, so they win).
macro_rules! settings {
    (
        $(#[$meta:meta])*
        pub struct $Flags:ident, file $File:ident, resolved $Resolved:ident {
            $(
                $(#[doc = $doc:literal])*
                $(#[arg($($arg:tt)*)])*
                $name:ident : $shape:ident<$t:ty> $(= $default:literal)?
            ),* $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Default, clap::Args)]
        pub struct $Flags {
            $(
                #[arg(
                    long,
                    help = $crate::cli::settings::help(&[$($doc),*], None $(.or(Some($default)))?),
                    value_name = <$t as $crate::cli::settings::Value>::NAME,
                    value_parser = <$t as $crate::cli::settings::Value>::parse,
                    num_args = <$t as $crate::cli::settings::Value>::NUM_ARGS,
                    default_missing_value = <$t as $crate::cli::settings::Value>::MISSING,
                )]
                $(#[arg($($arg)*)])*
                pub $name: $shape<$t>,
            )*
        }

        /// The file's section for these settings: the same keys as the
        /// flags.
        #[derive(Debug, Clone, Default, serde::Deserialize)]
        #[serde(deny_unknown_fields, rename_all = "kebab-case")]
        pub struct $File {
            $(
                #[serde(default, deserialize_with = "crate::cli::settings::de")]
                pub $name: Option<$shape<$t>>,
            )*
        }

        /// Flags over the file over the defaults.
        #[derive(Debug, Clone)]
        pub struct $Resolved {
            $(
                $(#[doc = $doc])*
                pub $name: $crate::cli::settings::resolved_type!($shape<$t> $(= $default)?),
            )*
        }

        impl $Flags {
            /// Flags over `file` over the defaults.
            pub fn merge(&self, file: &$File) -> $Resolved {
                $Resolved {
                    $(
                        $name: $crate::cli::settings::resolve_value!(
                            $shape,
                            <$shape<$t> as $crate::cli::settings::Shape>::given(&self.$name, &file.$name),
                            $($default)?
                        ),
                    )*
                }
            }

            /// The flags given, as `rotor up` passes them to a child.
            pub fn to_args(&self) -> Vec<std::ffi::OsString> {
                let mut out = Vec::new();
                $(
                    $crate::cli::settings::Shape::to_args(&self.$name, stringify!($name), &mut out);
                )*
                out
            }
        }
    };
}

pub(crate) use {resolve_value, resolved_type, settings};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_from_flags_replace_the_files_and_defaults_fill_in() {
        let flag: Vec<u16> = vec![];
        assert_eq!(Shape::given(&flag, &Some(vec![1u16])), Some(vec![1]));
        assert_eq!(Shape::given(&flag, &Some(vec![])), Some(vec![]));
        assert_eq!(Shape::given(&flag, &None), None);
        assert_eq!(Shape::given(&vec![2u16], &Some(vec![1u16])), Some(vec![2]));
        assert_eq!(<Vec<u16> as Shape>::default("25,465"), vec![25, 465]);
        let e = <u16 as Value>::parse("25,465").unwrap_err();
        assert!(e.contains("repeat the flag"), "{e}");
        assert_eq!(<Vec<u16> as Shape>::default(""), Vec::<u16>::new());
        let one: Option<Duration> = None;
        assert_eq!(
            Shape::given(&one, &Some(Some(Duration::from_secs(3)))),
            Some(Some(Duration::from_secs(3)))
        );
    }

    #[test]
    fn values_survive_the_trip_through_to_args() {
        let mut out = Vec::new();
        Shape::to_args(
            &Some(Duration::from_millis(1500)),
            "drain_timeout",
            &mut out,
        );
        Shape::to_args(&vec![25u16, 465], "deny_port", &mut out);
        Shape::to_args(&Some(true), "no_auth", &mut out);
        assert_eq!(
            out,
            [
                "--drain-timeout=1s 500ms",
                "--deny-port=25",
                "--deny-port=465",
                "--no-auth=true"
            ]
        );
        assert_eq!(
            <Duration as Value>::parse("1s 500ms"),
            Ok(Duration::from_millis(1500))
        );
        // Past what a deadline can hold: refused, not a panic later.
        assert!(<Duration as Value>::parse("500000000000y").is_err());
        // "At most 10 years" takes 10 years as written.
        assert!(<Duration as Value>::parse("10y").is_ok());
        assert!(<Duration as Value>::parse("10y 1s").is_err());
        assert!(<Duration as Value>::parse("3650days").is_ok());
    }
}
