//! The Java client's default partitioner, so tools can tell which partition holds
//! a world's events without asking Kafka to route a write.
//!
//! librdkafka's `murmur2_random` (set on every worldline producer) and Java's
//! `BuiltInPartitioner` both place a keyed record at
//! `(murmur2(key) & 0x7fffffff) % partitions`.

/// Kafka's murmur2 hash (the variant in `org.apache.kafka.common.utils.Utils`).
pub fn murmur2(data: &[u8]) -> u32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let length = data.len() as u32;
    let mut h: u32 = SEED ^ length;
    let mut chunks = data.chunks_exact(4);
    for chunk in &mut chunks {
        let mut k = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let tail = chunks.remainder();
    if tail.len() >= 3 {
        h ^= u32::from(tail[2]) << 16;
    }
    if tail.len() >= 2 {
        h ^= u32::from(tail[1]) << 8;
    }
    if !tail.is_empty() {
        h ^= u32::from(tail[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h
}

/// The partition a record with this key goes to, as Java and librdkafka's
/// `murmur2_random` compute it.
pub fn partition_for_key(key: &[u8], partitions: i32) -> i32 {
    let positive = murmur2(key) & 0x7fff_ffff;
    (positive % partitions.max(1) as u32) as i32
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values from the Java client's own `UtilsTest.testMurmur2` (as signed ints).
    #[test]
    fn matches_the_java_client() {
        let cases: [(&str, i32); 6] = [
            ("21", -973_932_308),
            ("foobar", -790_332_482),
            ("a-little-bit-long-string", -985_981_536),
            ("a-little-bit-longer-string", -1_486_304_829),
            (
                "lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58_897_971,
            ),
            ("abc", 479_470_107),
        ];
        for (key, expected) in cases {
            assert_eq!(murmur2(key.as_bytes()) as i32, expected, "key {key}");
        }
    }

    #[test]
    fn partitions_are_in_range_and_stable() {
        for key in ["demo", "emberfall", "w-1", ""] {
            let p = partition_for_key(key.as_bytes(), 8);
            assert!((0..8).contains(&p));
            assert_eq!(p, partition_for_key(key.as_bytes(), 8));
        }
    }
}
