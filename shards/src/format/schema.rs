//! Which columns a DFNDR file has ([`Layout`]) and their exact arrow types (SPEC section 3).
//!
//! Columns of stages that did not run are absent, never filled with placeholder values, so a
//! reader can tell "not computed" from "computed as zero". The layout is therefore derived from
//! the schema itself; the `dfndr.layout` metadata entry is only a convenience copy.

use std::collections::HashSet;
use std::sync::Arc;

use arrow_schema::{DataType, Field, FieldRef, Fields, Schema};
use serde::{Deserialize, Serialize};

use super::FormatError;

/// Column names of DFNDR v1.
pub mod col {
    /// Webdataset key.
    pub const KEY: &str = "key";
    /// Input shard URI (dictionary encoded).
    pub const SOURCE: &str = "source";
    /// URL from `KEY.json`, nullable.
    pub const URL: &str = "url";
    /// Ground-truth caption.
    pub const CAPTION: &str = "caption";
    /// Decoded original width in pixels.
    pub const WIDTH: &str = "width";
    /// Decoded original height in pixels.
    pub const HEIGHT: &str = "height";
    /// Original encoded image bytes (only with `embed_images`).
    pub const IMAGE: &str = "image";
    /// Augmentation parameters (augmentation stage).
    pub const PAUG: &str = "paug";
    /// Teacher embeddings of each augmented view (teacher stage).
    pub const IMAGE_EMB: &str = "image_emb";
    /// Teacher embedding of the ground-truth caption (teacher stage).
    pub const TEXT_EMB: &str = "text_emb";
    /// Prefix of the synthetic-caption columns (captioner stage).
    pub const SYN_PREFIX: &str = "syn_text_";
    /// Suffix of the synthetic-caption embedding columns (teacher stage).
    pub const EMB_SUFFIX: &str = "_emb";

    /// Name of the synthetic-caption column of `tag`.
    pub fn syn_text(tag: &str) -> String {
        format!("{SYN_PREFIX}{tag}")
    }

    /// Name of the synthetic-caption embedding column of `tag`.
    pub fn syn_text_emb(tag: &str) -> String {
        format!("{SYN_PREFIX}{tag}{EMB_SUFFIX}")
    }
}

/// Storage precision of embedding columns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EmbDtype {
    /// IEEE half precision, round-to-nearest-even from f32 (the default: embeddings are
    /// unit-normalised, so 10 mantissa bits lose almost nothing and halve the file).
    #[default]
    #[serde(alias = "float16")]
    F16,
    /// IEEE single precision, stored exactly.
    #[serde(alias = "float32")]
    F32,
}

impl EmbDtype {
    fn arrow(self) -> DataType {
        match self {
            EmbDtype::F16 => DataType::Float16,
            EmbDtype::F32 => DataType::Float32,
        }
    }
}

/// Shape and precision shared by every embedding column of a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct EmbLayout {
    /// Embedding width D: the sum of the teachers' dimensions.
    pub dim: usize,
    /// Storage precision.
    #[serde(default)]
    pub dtype: EmbDtype,
}

/// One captioner's synthetic-caption columns.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SynLayout {
    /// Captioner tag: non-empty, `[a-z0-9_]` only, not ending in `_emb`, unique in a layout.
    pub tag: String,
    /// Whether `syn_text_TAG_emb` (their teacher text embeddings) is present.
    pub with_emb: bool,
}

/// Which optional columns a DFNDR file has.
///
/// The required columns (`key`, `source`, `url`, `caption`, `width`, `height`) are always
/// present. `emb` only matters when some embedding column is present; a layout recovered from a
/// file without embedding columns has `emb: None`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct Layout {
    /// Column `image`: the original encoded bytes.
    pub embed_images: bool,
    /// Column `paug`: augmentation parameters.
    pub paug: bool,
    /// Shape and precision of every embedding column.
    pub emb: Option<EmbLayout>,
    /// Column `image_emb`.
    pub image_emb: bool,
    /// Column `text_emb`.
    pub text_emb: bool,
    /// Synthetic-caption columns, in column order.
    pub syn: Vec<SynLayout>,
}

/// A list child field. Arrow's conventional name `item` is used on write; readers ignore the
/// name because other writers (pyarrow's compliant mode) call it `element`.
fn item(data_type: DataType) -> FieldRef {
    Arc::new(Field::new("item", data_type, false))
}

pub(crate) fn list_of(data_type: DataType) -> DataType {
    DataType::List(item(data_type))
}

/// `fixed_size_list<int32, 4>`: the crop box (top, left, height, width).
pub(crate) fn crop_type() -> DataType {
    DataType::FixedSizeList(item(DataType::Int32), 4)
}

/// `struct<op: uint8, magnitude: float32>`.
pub(crate) fn op_fields() -> Fields {
    Fields::from(vec![
        Field::new("op", DataType::UInt8, false),
        Field::new("magnitude", DataType::Float32, false),
    ])
}

/// `struct<crop, flip, ops>`: one augmentation.
pub(crate) fn paug_fields() -> Fields {
    Fields::from(vec![
        Field::new("crop", crop_type(), false),
        Field::new("flip", DataType::Boolean, false),
        Field::new("ops", list_of(DataType::Struct(op_fields())), false),
    ])
}

/// `list<struct<crop, flip, ops>>`.
pub(crate) fn paug_type() -> DataType {
    list_of(DataType::Struct(paug_fields()))
}

/// `fixed_size_list<float16|float32, D>`.
pub(crate) fn emb_vector_type(emb: EmbLayout) -> Result<DataType, FormatError> {
    let dim = i32::try_from(emb.dim).map_err(|_| {
        FormatError::InvalidLayout(format!("embedding dim {} is too large", emb.dim))
    })?;
    Ok(DataType::FixedSizeList(item(emb.dtype.arrow()), dim))
}

/// `list<fixed_size_list<float16|float32, D>>`.
pub(crate) fn emb_type(emb: EmbLayout) -> Result<DataType, FormatError> {
    Ok(list_of(emb_vector_type(emb)?))
}

fn source_type() -> DataType {
    DataType::Dictionary(Box::new(DataType::Int32), Box::new(DataType::Utf8))
}

fn schema_err(column: &str, reason: impl Into<String>) -> FormatError {
    FormatError::Schema {
        column: column.to_string(),
        reason: reason.into(),
    }
}

impl Layout {
    /// Checks that the layout describes a valid file: tags are non-empty, `[a-z0-9_]` only, do
    /// not end in `_emb` (which would make `syn_text_A_emb` ambiguous) and are unique; embedding
    /// columns have an [`EmbLayout`] with `dim >= 1`.
    pub fn validate(&self) -> Result<(), FormatError> {
        let mut seen = HashSet::new();
        for syn in &self.syn {
            let tag = syn.tag.as_str();
            if tag.is_empty() {
                return Err(FormatError::InvalidLayout(
                    "a synthetic-caption tag is empty".into(),
                ));
            }
            if let Some(bad) = tag
                .chars()
                .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_'))
            {
                return Err(FormatError::InvalidLayout(format!(
                    "synthetic-caption tag {tag:?} contains {bad:?}; tags may only use a-z, 0-9 and _"
                )));
            }
            if tag.ends_with(col::EMB_SUFFIX) {
                return Err(FormatError::InvalidLayout(format!(
                    "synthetic-caption tag {tag:?} ends in {:?}, which is reserved for embedding columns",
                    col::EMB_SUFFIX
                )));
            }
            if !seen.insert(tag) {
                return Err(FormatError::InvalidLayout(format!(
                    "synthetic-caption tag {tag:?} appears twice"
                )));
            }
        }
        let needs_emb = self.image_emb || self.text_emb || self.syn.iter().any(|s| s.with_emb);
        match self.emb {
            None if needs_emb => Err(FormatError::InvalidLayout(
                "embedding columns (image_emb, text_emb or syn_text_*_emb) need `emb` (dim and dtype)"
                    .into(),
            )),
            Some(emb) if emb.dim == 0 => Err(FormatError::InvalidLayout(
                "embedding dim must be at least 1".into(),
            )),
            Some(emb) => emb_vector_type(emb).map(|_| ()),
            None => Ok(()),
        }
    }

    /// Whether any embedding column is present.
    pub fn has_emb_columns(&self) -> bool {
        self.image_emb || self.text_emb || self.syn.iter().any(|s| s.with_emb)
    }

    /// Column names in file order.
    pub fn column_names(&self) -> Vec<String> {
        let mut names: Vec<String> = [
            col::KEY,
            col::SOURCE,
            col::URL,
            col::CAPTION,
            col::WIDTH,
            col::HEIGHT,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let optional = [
            (self.embed_images, col::IMAGE),
            (self.paug, col::PAUG),
            (self.image_emb, col::IMAGE_EMB),
            (self.text_emb, col::TEXT_EMB),
        ];
        names.extend(
            optional
                .iter()
                .filter(|(on, _)| *on)
                .map(|(_, n)| n.to_string()),
        );
        for syn in &self.syn {
            names.push(col::syn_text(&syn.tag));
            if syn.with_emb {
                names.push(col::syn_text_emb(&syn.tag));
            }
        }
        names
    }

    /// The arrow schema of a file with this layout, exactly as SPEC section 3 prescribes.
    /// Carries no metadata: the writer stores the DFNDR metadata in parquet key-value metadata.
    pub fn arrow_schema(&self) -> Result<Schema, FormatError> {
        self.validate()?;
        let mut fields = vec![
            Field::new(col::KEY, DataType::Utf8, false),
            Field::new(col::SOURCE, source_type(), false),
            Field::new(col::URL, DataType::Utf8, true),
            Field::new(col::CAPTION, DataType::Utf8, false),
            Field::new(col::WIDTH, DataType::UInt32, false),
            Field::new(col::HEIGHT, DataType::UInt32, false),
        ];
        if self.embed_images {
            fields.push(Field::new(col::IMAGE, DataType::Binary, true));
        }
        if self.paug {
            fields.push(Field::new(col::PAUG, paug_type(), false));
        }
        // validate() guarantees `emb` whenever an embedding column is requested.
        let emb = |name: &str| -> Result<Field, FormatError> {
            let layout = self
                .emb
                .ok_or_else(|| FormatError::InvalidLayout(format!("column {name} needs `emb`")))?;
            Ok(Field::new(name, emb_type(layout)?, false))
        };
        if self.image_emb {
            fields.push(emb(col::IMAGE_EMB)?);
        }
        if self.text_emb {
            fields.push(emb(col::TEXT_EMB)?);
        }
        for syn in &self.syn {
            fields.push(Field::new(
                col::syn_text(&syn.tag),
                list_of(DataType::Utf8),
                false,
            ));
            if syn.with_emb {
                fields.push(emb(&col::syn_text_emb(&syn.tag))?);
            }
        }
        Ok(Schema::new(fields))
    }

    /// Recovers the layout of a DFNDR v1 schema, refusing anything else with an error naming the
    /// first offending column.
    ///
    /// Deliberately tolerant in two ways, so files rewritten by other tools (pyarrow, polars)
    /// still read: list child names are ignored (`item` vs `element`), and nullability flags are
    /// not compared (the reader refuses actual nulls in non-nullable columns row by row).
    /// `source` may also be plain utf8 instead of dictionary<int32, utf8>.
    pub fn from_arrow_schema(schema: &Schema) -> Result<Layout, FormatError> {
        let fields = schema.fields();
        let required: [(&str, DataType); 6] = [
            (col::KEY, DataType::Utf8),
            (col::SOURCE, source_type()),
            (col::URL, DataType::Utf8),
            (col::CAPTION, DataType::Utf8),
            (col::WIDTH, DataType::UInt32),
            (col::HEIGHT, DataType::UInt32),
        ];
        for (pos, (name, expected)) in required.iter().enumerate() {
            let field = fields
                .get(pos)
                .ok_or_else(|| schema_err(name, format!("missing (expected at position {pos})")))?;
            if field.name() != name {
                return Err(schema_err(
                    name,
                    format!(
                        "expected at position {pos}, found column `{}` there",
                        field.name()
                    ),
                ));
            }
            let plain_source = *name == col::SOURCE && field.data_type() == &DataType::Utf8;
            if !plain_source && !same_type(field.data_type(), expected) {
                return Err(schema_err(
                    name,
                    format!("has type {}, expected {expected}", field.data_type()),
                ));
            }
        }

        let mut layout = Layout::default();
        // Optional columns must appear in spec order; `stage` is the next allowed position.
        let mut stage = 0u8;
        let mut emb_seen: Option<(EmbLayout, String)> = None;
        let mut check_emb = |name: &str, dt: &DataType| -> Result<(), FormatError> {
            let found = parse_emb_type(dt).ok_or_else(|| {
                schema_err(
                    name,
                    format!("has type {dt}, expected list<fixed_size_list<float16 or float32, D>>"),
                )
            })?;
            match &emb_seen {
                Some((first, first_name)) if *first != found => Err(schema_err(
                    name,
                    format!(
                        "has embedding type {dt}, but `{first_name}` has dim {} {:?}; all embedding columns share one dim and dtype",
                        first.dim, first.dtype
                    ),
                )),
                Some(_) => Ok(()),
                None => {
                    emb_seen = Some((found, name.to_string()));
                    Ok(())
                }
            }
        };
        for field in fields.iter().skip(required.len()) {
            let name = field.name().as_str();
            let dt = field.data_type();
            let order_err = || {
                schema_err(
                    name,
                    "is out of order; columns must be key, source, url, caption, width, height, image, paug, image_emb, text_emb, then per tag syn_text_TAG, syn_text_TAG_emb",
                )
            };
            match name {
                col::IMAGE => {
                    if stage > 0 {
                        return Err(order_err());
                    }
                    if !same_type(dt, &DataType::Binary) {
                        return Err(schema_err(name, format!("has type {dt}, expected binary")));
                    }
                    layout.embed_images = true;
                    stage = 1;
                }
                col::PAUG => {
                    if stage > 1 {
                        return Err(order_err());
                    }
                    if !same_type(dt, &paug_type()) {
                        return Err(schema_err(
                            name,
                            format!("has type {dt}, expected {}", paug_type()),
                        ));
                    }
                    layout.paug = true;
                    stage = 2;
                }
                col::IMAGE_EMB => {
                    if stage > 2 {
                        return Err(order_err());
                    }
                    check_emb(name, dt)?;
                    layout.image_emb = true;
                    stage = 3;
                }
                col::TEXT_EMB => {
                    if stage > 3 {
                        return Err(order_err());
                    }
                    check_emb(name, dt)?;
                    layout.text_emb = true;
                    stage = 4;
                }
                _ => {
                    let Some(rest) = name.strip_prefix(col::SYN_PREFIX) else {
                        return Err(schema_err(name, "is not a DFNDR v1 column"));
                    };
                    stage = 5;
                    // Tags never end in `_emb`, so the suffix unambiguously marks an embedding.
                    if let Some(tag) = rest.strip_suffix(col::EMB_SUFFIX) {
                        match layout.syn.last_mut() {
                            Some(last) if last.tag == tag && !last.with_emb => {
                                check_emb(name, dt)?;
                                last.with_emb = true;
                            }
                            _ => {
                                return Err(schema_err(
                                    name,
                                    format!(
                                        "must directly follow its caption column `{}`",
                                        col::syn_text(tag)
                                    ),
                                ))
                            }
                        }
                    } else {
                        if !same_type(dt, &list_of(DataType::Utf8)) {
                            return Err(schema_err(
                                name,
                                format!("has type {dt}, expected list<utf8>"),
                            ));
                        }
                        layout.syn.push(SynLayout {
                            tag: rest.to_string(),
                            with_emb: false,
                        });
                    }
                }
            }
        }
        layout.emb = emb_seen.map(|(emb, _)| emb);
        layout.validate().map_err(|e| match e {
            FormatError::InvalidLayout(reason) => schema_err("syn_text_*", reason),
            other => other,
        })?;
        Ok(layout)
    }
}

/// Recognises `list<fixed_size_list<float16|float32, D>>`.
fn parse_emb_type(dt: &DataType) -> Option<EmbLayout> {
    let DataType::List(outer) = dt else {
        return None;
    };
    let DataType::FixedSizeList(inner, dim) = outer.data_type() else {
        return None;
    };
    let dtype = match inner.data_type() {
        DataType::Float16 => EmbDtype::F16,
        DataType::Float32 => EmbDtype::F32,
        _ => return None,
    };
    let dim = usize::try_from(*dim).ok().filter(|d| *d > 0)?;
    Some(EmbLayout { dim, dtype })
}

/// Type equality up to list child names and nullability flags (see
/// [`Layout::from_arrow_schema`]). Struct field names and order still matter.
pub(crate) fn same_type(a: &DataType, b: &DataType) -> bool {
    match (a, b) {
        (DataType::List(x), DataType::List(y)) => same_type(x.data_type(), y.data_type()),
        (DataType::FixedSizeList(x, n), DataType::FixedSizeList(y, m)) => {
            n == m && same_type(x.data_type(), y.data_type())
        }
        (DataType::Struct(xs), DataType::Struct(ys)) => {
            xs.len() == ys.len()
                && xs
                    .iter()
                    .zip(ys.iter())
                    .all(|(x, y)| x.name() == y.name() && same_type(x.data_type(), y.data_type()))
        }
        _ => a == b,
    }
}
