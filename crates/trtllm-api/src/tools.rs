//! Tool calling: the functions a model may call (OpenAI's `tools`), which of them it must call
//! (`tool_choice`), and the grammar that makes a forced call's arguments valid by construction.
//! Reading calls back out of generated text is [`crate::tool_parser`]'s job.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::{ApiError, GuidedDecoding, Result};

/// A function the model may call.
#[derive(Clone, Debug, PartialEq)]
pub struct Tool {
    pub name: String,
    /// JSON schema of its arguments (`{"type": "object"}` when the definition gives none).
    pub parameters: Value,
    /// OpenAI's `{"type": "function", "function": {...}}` as given: what the template sees.
    definition: Value,
}

impl Tool {
    pub fn function(name: &str, description: Option<&str>, parameters: Value) -> Self {
        let mut f = json!({"name": name});
        if let Some(d) = description {
            f["description"] = json!(d);
        }
        f["parameters"] = parameters.clone();
        Self {
            name: name.into(),
            parameters,
            definition: json!({"type": "function", "function": f}),
        }
    }

    /// A tool in OpenAI's shape; an error names what is wrong with it.
    pub fn from_openai(v: Value) -> Result<Self> {
        let bad = |m: &str| ApiError::InvalidInput(format!("tool: {m}"));
        if v.get("type").and_then(Value::as_str) != Some("function") {
            return Err(bad("type must be \"function\""));
        }
        let f = v
            .get("function")
            .ok_or_else(|| bad("function is missing"))?;
        let name = f
            .get("name")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
            .ok_or_else(|| bad("function.name must be a non-empty string"))?;
        let parameters = match f.get("parameters") {
            None | Some(Value::Null) => json!({"type": "object"}),
            Some(p @ Value::Object(_)) => p.clone(),
            Some(_) => {
                return Err(bad(&format!(
                    "{name}: parameters must be a JSON schema object"
                )))
            }
        };
        Ok(Self {
            name: name.into(),
            parameters,
            definition: v,
        })
    }

    pub fn definition(&self) -> &Value {
        &self.definition
    }
}

/// Which calls the model must make.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum ToolChoice {
    /// No call: the tools are only shown.
    None,
    /// The model decides; its calls are parsed from its text.
    #[default]
    Auto,
    /// At least one call, of any tool, under a grammar.
    Required,
    /// One call of this function, under a grammar.
    Function(String),
}

impl ToolChoice {
    /// OpenAI's `tool_choice`: `"none"`, `"auto"`, `"required"` or
    /// `{"type": "function", "function": {"name": ...}}`.
    pub fn from_openai(v: &Value) -> Result<Self> {
        match v {
            Value::String(s) => match s.as_str() {
                "none" => Ok(Self::None),
                "auto" => Ok(Self::Auto),
                "required" => Ok(Self::Required),
                other => Err(ApiError::InvalidInput(format!(
                    "tool_choice '{other}' is not one of none, auto, required or a function"
                ))),
            },
            _ => v
                .pointer("/function/name")
                .and_then(Value::as_str)
                .filter(|_| v.get("type").and_then(Value::as_str) == Some("function"))
                .map(|n| Self::Function(n.into()))
                .ok_or_else(|| {
                    ApiError::InvalidInput(
                        "tool_choice: expected {\"type\": \"function\", \"function\": {\"name\": ...}}"
                            .into(),
                    )
                }),
        }
    }

    /// The grammar a forced choice generates under: for `Required`, a JSON array of
    /// `{"name", "arguments"}` objects, each valid for its function (one only unless
    /// `parallel`); for a named function, its arguments object. None for `None` and `Auto`.
    pub fn grammar(&self, tools: &[Tool], parallel: bool) -> Result<Option<GuidedDecoding>> {
        match self {
            Self::None | Self::Auto => Ok(None),
            Self::Required => {
                if tools.is_empty() {
                    return Err(ApiError::InvalidInput(
                        "tool_choice 'required' needs tools".into(),
                    ));
                }
                let calls: Vec<Value> = tools
                    .iter()
                    .map(|t| {
                        json!({
                            "type": "object",
                            "properties": {"name": {"const": t.name}, "arguments": t.parameters},
                            "required": ["name", "arguments"],
                            "additionalProperties": false,
                        })
                    })
                    .collect();
                let mut schema = json!({"type": "array", "minItems": 1, "items": {"anyOf": calls}});
                if !parallel {
                    schema["maxItems"] = json!(1);
                }
                Ok(Some(GuidedDecoding::JsonSchema(schema)))
            }
            Self::Function(name) => {
                let tool = tools.iter().find(|t| &t.name == name).ok_or_else(|| {
                    let names: Vec<&str> = tools.iter().map(|t| t.name.as_str()).collect();
                    ApiError::InvalidInput(format!(
                        "tool_choice names function '{name}', which is not among the tools ({})",
                        names.join(", ")
                    ))
                })?;
                Ok(Some(GuidedDecoding::JsonSchema(tool.parameters.clone())))
            }
        }
    }
}

/// A call the model made: OpenAI's `tool_calls` entry, `arguments` a JSON object as text.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    pub arguments: String,
}

impl ToolCall {
    /// A call with a fresh id (`call_` and 24 random letters and digits).
    pub fn new(name: String, arguments: String) -> Self {
        use rand::distr::{Alphanumeric, SampleString};
        let id = format!("call_{}", Alphanumeric.sample_string(&mut rand::rng(), 24));
        Self {
            id,
            name,
            arguments,
        }
    }

    /// OpenAI's shape, with `arguments` as the object it holds when it holds one.
    pub(crate) fn template_value(&self) -> Value {
        let args = serde_json::from_str(&self.arguments)
            .unwrap_or_else(|_| Value::String(self.arguments.clone()));
        json!({"id": self.id, "type": "function",
            "function": {"name": self.name, "arguments": args}})
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weather() -> Tool {
        Tool::from_openai(
            json!({"type": "function", "function": {"name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
            "required": ["city"]}}}),
        )
        .unwrap()
    }

    #[test]
    fn tool_definitions_are_checked() {
        assert!(Tool::from_openai(json!({"type": "function", "function": {}})).is_err());
        assert!(Tool::from_openai(json!({"type": "code"})).is_err());
        let t =
            Tool::from_openai(json!({"type": "function", "function": {"name": "now"}})).unwrap();
        assert_eq!(t.parameters, json!({"type": "object"}));
    }

    #[test]
    fn choices_parse_and_name_known_functions() {
        let tools = [weather()];
        assert_eq!(
            ToolChoice::from_openai(&json!("required")).unwrap(),
            ToolChoice::Required
        );
        let named = json!({"type": "function", "function": {"name": "get_weather"}});
        let choice = ToolChoice::from_openai(&named).unwrap();
        assert_eq!(
            choice.grammar(&tools, true).unwrap(),
            Some(GuidedDecoding::JsonSchema(tools[0].parameters.clone()))
        );
        let other = ToolChoice::Function("nope".into());
        assert!(other
            .grammar(&tools, true)
            .unwrap_err()
            .to_string()
            .contains("get_weather"));
        assert!(ToolChoice::from_openai(&json!("any")).is_err());
        assert!(ToolChoice::Required.grammar(&[], true).is_err());
        let Some(GuidedDecoding::JsonSchema(s)) =
            ToolChoice::Required.grammar(&tools, false).unwrap()
        else {
            panic!("a schema")
        };
        assert_eq!(s["maxItems"], 1);
    }
}
