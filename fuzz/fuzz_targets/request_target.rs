//! Arbitrary request targets (absolute-form and CONNECT authority-form)
//! and destination rules: a verdict or a clean error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(uri) = text.parse::<http::Uri>() {
        let _ = rotor_worker::proxy::check_target(&uri, false);
        let _ = rotor_worker::proxy::check_target(&uri, true);
    }
    let _ = text.parse::<rotor_worker::acl::Cidr>();
});
