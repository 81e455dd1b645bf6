//! Arbitrary bytes as a client's requests (the worker's fast path: what it
//! takes is whole, what it leaves for hyper's server is every byte it did
//! not take) and as a destination's response (head, framing, body: a
//! response or a clean error, never a panic).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    rotor_worker::fast::take_all_for_fuzzing(data);
    rotor_worker::h1::read_response_for_fuzzing(data, false);
    rotor_worker::h1::read_response_for_fuzzing(data, true);
});
