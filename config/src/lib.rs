//! Configuration files for ftvm: the appliance (`ftvm`) and the witness
//! (`ftvm-witness`). Every error names the file and the key that was wrong.
#![forbid(unsafe_code)]

pub mod appliance;
pub mod witness;

use serde::de::DeserializeOwned;
use std::path::{Path, PathBuf};

/// An error loading or validating a configuration file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read config: {source}")]
    Read {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}: TOML syntax error: {message}")]
    Syntax { file: PathBuf, message: String },
    #[error("{file}: key `{key}`: {message}")]
    Invalid {
        file: PathBuf,
        key: String,
        message: String,
    },
}

impl ConfigError {
    /// A validation error for `key` in `file`.
    pub fn invalid(file: &Path, key: &str, message: impl Into<String>) -> Self {
        ConfigError::Invalid {
            file: file.to_path_buf(),
            key: key.to_string(),
            message: message.into(),
        }
    }
}

/// Parses `text` (the contents of `file`) as `T`. Unknown keys are errors when
/// `T` uses `#[serde(deny_unknown_fields)]`; the error names the full key path.
pub fn parse_toml<T: DeserializeOwned>(file: &Path, text: &str) -> Result<T, ConfigError> {
    let de = toml::Deserializer::new(text);
    serde_path_to_error::deserialize(de).map_err(|err| {
        let key = err.path().to_string();
        let inner = err.into_inner();
        let message = inner.message().to_string();
        if key.is_empty() || key == "." {
            // serde reports unknown top-level keys and syntax errors without a path.
            match unknown_field(&message) {
                Some(field) => ConfigError::invalid(file, &field, message),
                None => ConfigError::Syntax {
                    file: file.to_path_buf(),
                    message: inner.to_string().trim().to_string(),
                },
            }
        } else {
            // serde_path_to_error sometimes already ends the path with the unknown field.
            let key = match unknown_field(&message) {
                Some(field) if !key.ends_with(&format!(".{field}")) && key != field => {
                    format!("{key}.{field}")
                }
                _ => key,
            };
            ConfigError::invalid(file, &key, message)
        }
    })
}

/// Reads and parses a TOML file.
pub fn load_toml<T: DeserializeOwned>(file: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(file).map_err(|source| ConfigError::Read {
        file: file.to_path_buf(),
        source,
    })?;
    parse_toml(file, &text)
}

/// Resolves a path written in a config file: absolute paths stay, relative
/// ones are taken from the directory holding the config file.
pub fn resolve_path(config_file: &Path, value: &Path) -> PathBuf {
    if value.is_absolute() {
        value.to_path_buf()
    } else {
        config_file
            .parent()
            .unwrap_or_else(|| Path::new("."))
            .join(value)
    }
}

fn unknown_field(message: &str) -> Option<String> {
    let rest = message.strip_prefix("unknown field `")?;
    Some(rest.split('`').next()?.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Outer {
        #[allow(dead_code)]
        inner: Inner,
    }
    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Inner {
        #[allow(dead_code)]
        size: u32,
    }

    #[test]
    fn unknown_nested_key_is_named() {
        let err =
            parse_toml::<Outer>(Path::new("x.toml"), "[inner]\nsize = 1\nsise = 2\n").unwrap_err();
        let text = err.to_string();
        assert!(text.contains("x.toml"), "{text}");
        assert!(text.contains("inner.sise"), "{text}");
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Many {
        #[allow(dead_code)]
        item: Vec<Inner>,
    }

    #[test]
    fn unknown_key_in_array_of_tables_is_named_once() {
        let err = parse_toml::<Many>(Path::new("x.toml"), "[[item]]\nsize = 1\nsise = 2\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("`item[0].sise`"), "{err}");
        assert!(!err.contains("sise.sise"), "{err}");
    }

    #[test]
    fn unknown_top_key_is_named() {
        let err =
            parse_toml::<Outer>(Path::new("x.toml"), "bogus = 1\n[inner]\nsize = 1\n").unwrap_err();
        assert!(err.to_string().contains("`bogus`"), "{err}");
    }

    #[test]
    fn bad_value_names_key() {
        let err =
            parse_toml::<Outer>(Path::new("x.toml"), "[inner]\nsize = \"big\"\n").unwrap_err();
        let text = err.to_string();
        assert!(text.contains("key `inner.size`"), "{text}");
    }

    #[test]
    fn missing_file_names_file() {
        let err = load_toml::<Outer>(Path::new("/nonexistent/ftvm.toml")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/ftvm.toml"), "{err}");
    }
}
