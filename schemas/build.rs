//! Compiles `proto/worldline/v1/*.proto` with protox (pure Rust, so no `protoc`
//! binary is needed on any machine) and generates the prost types.

use std::path::PathBuf;

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto_root = PathBuf::from("proto");
    let mut files: Vec<PathBuf> = std::fs::read_dir(proto_root.join("worldline/v1"))?
        .map(|entry| entry.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    files.retain(|p| p.extension().is_some_and(|ext| ext == "proto"));
    files.sort();
    for file in &files {
        println!("cargo:rerun-if-changed={}", file.display());
    }
    println!("cargo:rerun-if-changed=proto");

    let descriptors = protox::compile(&files, [&proto_root])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    // Kept beside the generated code so tools can render any event as JSON by reflection.
    std::fs::write(
        out_dir.join("worldline_v1_descriptor.bin"),
        descriptors.encode_to_vec(),
    )?;
    prost_build::Config::new().compile_fds(descriptors)?;
    Ok(())
}
