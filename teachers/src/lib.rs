//! dfndr-teachers: the CLIP tokenizer (OpenCLIP SimpleTokenizer semantics); the
//! OpenCLIP-compatible towers and teacher ensembles follow.

pub mod tokenizer;
