//! What the CPU is, for benchmarks and reports that must say what they ran on: its model name
//! and the vector instruction sets our kernels can choose between.

/// The CPU's model name as it reports it (CPUID brand string on x86-64), or `"unknown"`.
pub fn model() -> String {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::__cpuid;
        // Leaf 0x80000000 says which extended leaves exist; the brand string leaves are read
        // only when they do.
        let max = __cpuid(0x8000_0000).eax;
        if max >= 0x8000_0004 {
            let mut bytes = Vec::with_capacity(48);
            for leaf in 0x8000_0002u32..=0x8000_0004 {
                let r = __cpuid(leaf);
                for reg in [r.eax, r.ebx, r.ecx, r.edx] {
                    bytes.extend_from_slice(&reg.to_le_bytes());
                }
            }
            let name = String::from_utf8_lossy(&bytes);
            let name = name.trim_matches(|c: char| c == '\0' || c.is_whitespace());
            if !name.is_empty() {
                return name.to_string();
            }
        }
    }
    "unknown".to_string()
}

/// The vector instruction sets of this CPU that matter to our kernels (names as Linux spells
/// them in /proc/cpuinfo), in a fixed order.
pub fn features() -> Vec<&'static str> {
    let mut out = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        for (name, present) in [
            ("avx2", has!("avx2")),
            ("fma", has!("fma")),
            ("avx512f", has!("avx512f")),
            ("avx512bw", has!("avx512bw")),
            ("avx512_vnni", has!("avx512vnni")),
            ("avx512_bf16", has!("avx512bf16")),
        ] {
            if present {
                out.push(name);
            }
        }
        // AMX (CPUID leaf 7, EDX bits 22 bf16, 24 tile, 25 int8); the operating system must
        // also grant a process the tile state before it may use it.
        // Leaf 7 is read only when it exists.
        if std::arch::x86_64::__cpuid(0).eax >= 7 {
            let edx = std::arch::x86_64::__cpuid_count(7, 0).edx;
            for (name, bit) in [("amx_bf16", 22), ("amx_tile", 24), ("amx_int8", 25)] {
                if edx & (1 << bit) != 0 {
                    out.push(name);
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn model_and_features_are_reported() {
        assert!(!super::model().is_empty());
        let f = super::features();
        #[cfg(target_arch = "x86_64")]
        assert_eq!(
            f.contains(&"avx512f"),
            std::arch::is_x86_feature_detected!("avx512f")
        );
        let _ = f;
    }
}
