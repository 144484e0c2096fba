//! `soul export`: the stack as Compose or Kubernetes files, written atomically or printed.

use super::*;

pub(super) fn export_compose(ctx: &Context, path: Option<&Path>) -> Result<Exit, CliError> {
    let export = crate::export::compose_of(&ctx.stack, &ctx.state).map_err(PassError::from)?;
    write_export(path, &export.text, &format!("{} services", export.services))
}

pub(super) fn export_kubernetes(ctx: &Context, path: Option<&Path>) -> Result<Exit, CliError> {
    let m =
        crate::export::kubernetes::manifests_of(&ctx.stack, &ctx.state).map_err(PassError::from)?;
    let path = path.map(|p| export_file(p, &ctx.stack));
    write_export(path.as_deref(), &m.text, &format!("{} objects", m.objects))
}

/// `soul watch --export-kubernetes`: the export rewritten when it changed; a failure is logged,
/// never fatal to the watch.
pub(super) fn keep_kubernetes_export(stack: &Stack, state: &Path, path: &Path) {
    let file = export_file(path, stack);
    match crate::export::kubernetes::manifests_of(stack, state) {
        Ok(m) if std::fs::read_to_string(&file).ok().as_deref() == Some(m.text.as_str()) => {}
        Ok(m) => match write_file_atomically(&file, &m.text) {
            Ok(()) => tracing::info!("wrote {} ({} objects)", file.display(), m.objects),
            Err(e) => tracing::warn!("cannot write {}: {e}", file.display()),
        },
        Err(e) => tracing::warn!("cannot export the stack for Kubernetes: {e}"),
    }
}

/// An export's file: `path` itself, or `<stack>.yaml` in it when it is a directory (or ends in
/// `/`).
pub(super) fn export_file(path: &Path, stack: &Stack) -> PathBuf {
    if path.is_dir() || path.to_string_lossy().ends_with('/') {
        path.join(format!("{}.yaml", stack.stack))
    } else {
        path.to_path_buf()
    }
}

pub(super) fn write_file_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    crate::files::write_atomically(path, text.as_bytes(), crate::files::Access::AsBefore)
}

/// An export to `path` (atomically) or to stdout.
pub(super) fn write_export(path: Option<&Path>, text: &str, what: &str) -> Result<Exit, CliError> {
    match path {
        Some(p) => {
            write_file_atomically(p, text)
                .map_err(|e| CliError::Io(format!("cannot write {}: {e}", p.display())))?;
            eprintln!("wrote {} ({what})", p.display());
        }
        None => out(text),
    }
    Ok(Exit::Ok)
}
