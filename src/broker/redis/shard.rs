//! Which Redis instance holds a topic's (or user's) channel when several independent instances
//! are configured: jump consistent hash (Lamping & Veach, 2014) of the name's 64-bit FNV-1a hash.
//!
//! Both functions are a few lines in any language, so a backend publishing straight to Redis can
//! find the right instance itself (README: "Publishing from a backend").

/// 64-bit FNV-1a of `bytes`.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        hash ^= u64::from(*b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// Jump consistent hash: a bucket in `0..buckets` for `key`; growing `buckets` by one moves only
/// about 1/`buckets` of the keys.
pub fn jump_hash(mut key: u64, buckets: usize) -> usize {
    let buckets = buckets.max(1) as i64;
    let (mut b, mut j): (i64, i64) = (-1, 0);
    while j < buckets {
        b = j;
        key = key.wrapping_mul(2_862_933_555_777_941_757).wrapping_add(1);
        j = ((b + 1) as f64 * ((1u64 << 31) as f64 / ((key >> 33) + 1) as f64)) as i64;
    }
    b as usize
}

/// The shard of `name` among `shards` instances.
pub fn shard_of(name: &str, shards: usize) -> usize {
    jump_hash(fnv1a64(name.as_bytes()), shards)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv_reference_values() {
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn jump_hash_is_stable_and_moves_few_keys() {
        assert_eq!(jump_hash(0, 1), 0);
        let names: Vec<String> = (0..2000).map(|i| format!("topic-{i}")).collect();
        let two: Vec<usize> = names.iter().map(|n| shard_of(n, 2)).collect();
        let three: Vec<usize> = names.iter().map(|n| shard_of(n, 3)).collect();
        assert!(two.iter().all(|&s| s < 2) && three.iter().all(|&s| s < 3));
        // Both shards get a fair share.
        let on_first = two.iter().filter(|&&s| s == 0).count();
        assert!((800..1200).contains(&on_first), "{on_first}");
        // Going from 2 to 3 shards moves keys only onto the new shard.
        for (a, b) in two.iter().zip(&three) {
            assert!(a == b || *b == 2);
        }
    }
}
