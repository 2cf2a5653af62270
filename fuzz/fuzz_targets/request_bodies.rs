//! Every request body the API parses (tokenize, detokenize, charge), with the
//! handlers' validation: never a panic.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    tokenvault::api::fuzz_request_bodies(data);
});
