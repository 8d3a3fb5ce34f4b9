#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = cmr_fuzz::read_proof(data);
});
