//! Domain types: parse, don't validate. A [`card::Pan`] can only exist if it is a
//! well-formed card number; a [`token::Token`] only if it has a token's shape.
//! Nothing here does I/O.

pub mod card;
pub mod json;
pub mod scope;
pub mod tenant;
pub mod token;
