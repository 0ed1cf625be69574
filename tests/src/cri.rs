//! A blocking CRI client (the runtime.v1 calls a kubelet makes to start a pod), over
//! containerd's unix socket: pull an image, run a host-network pod sandbox, create and
//! start a container, read its status and log, and tear it all down.

use anyhow::{bail, Context, Result};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tonic::transport::{Channel, Endpoint};

/// The generated CRI subset.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("runtime.v1");
}

use pb::image_service_client::ImageServiceClient;
use pb::runtime_service_client::RuntimeServiceClient;

/// Time limit of one CRI call (a pull included).
const CALL_TIMEOUT: Duration = Duration::from_secs(300);

/// A CRI client bound to one containerd.
pub struct Cri {
    rt: tokio::runtime::Runtime,
    runtime: RuntimeServiceClient<Channel>,
    images: ImageServiceClient<Channel>,
}

/// A started pod: its sandbox and its one container.
pub struct Pod {
    pub sandbox_id: String,
    pub container_id: String,
    pub log_path: PathBuf,
}

impl Cri {
    /// Connects to containerd's socket.
    pub fn connect(socket: &Path) -> Result<Cri> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let path = socket.to_path_buf();
        let channel = rt.block_on(async move {
            Endpoint::from_static("http://cri.invalid")
                .timeout(CALL_TIMEOUT)
                .connect_with_connector(tower::service_fn(move |_| {
                    let path = path.clone();
                    async move {
                        let stream = tokio::net::UnixStream::connect(path).await?;
                        Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
                    }
                }))
                .await
        })?;
        Ok(Cri {
            rt,
            runtime: RuntimeServiceClient::new(channel.clone()),
            images: ImageServiceClient::new(channel),
        })
    }

    /// Connects once containerd's CRI plugin answers, within `timeout`.
    pub fn connect_when_ready(socket: &Path, timeout: Duration) -> Result<Cri> {
        let deadline = Instant::now() + timeout;
        loop {
            match Cri::connect(socket).and_then(|mut c| c.version().map(|_| c)) {
                Ok(c) => return Ok(c),
                Err(e) if Instant::now() > deadline => {
                    return Err(e.context(format!("CRI did not answer within {timeout:?}")))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// The runtime's name and version (checks the CRI plugin answers).
    pub fn version(&mut self) -> Result<String> {
        let v = self.rt.block_on(self.runtime.version(pb::VersionRequest {
            version: "v1".into(),
        }))?;
        let v = v.into_inner();
        Ok(format!("{} {}", v.runtime_name, v.runtime_version))
    }

    /// PullImage; returns the image reference containerd resolved.
    pub fn pull(&mut self, image: &str) -> Result<String> {
        let req = pb::PullImageRequest {
            image: Some(pb::ImageSpec {
                image: image.into(),
                annotations: HashMap::new(),
            }),
            ..Default::default()
        };
        let r = self
            .rt
            .block_on(self.images.pull_image(req))
            .with_context(|| format!("CRI PullImage {image}"))?;
        Ok(r.into_inner().image_ref)
    }

    /// RemoveImage.
    pub fn remove_image(&mut self, image: &str) -> Result<()> {
        let req = pb::RemoveImageRequest {
            image: Some(pb::ImageSpec {
                image: image.into(),
                annotations: HashMap::new(),
            }),
        };
        self.rt.block_on(self.images.remove_image(req))?;
        Ok(())
    }

    /// RunPodSandbox (host network, pid and ipc: no CNI), then CreateContainer and
    /// StartContainer of `image` running `command`, logging under `log_dir`.
    pub fn run_pod(
        &mut self,
        name: &str,
        image: &str,
        command: &[&str],
        log_dir: &Path,
    ) -> Result<Pod> {
        let node = pb::NamespaceOption {
            network: pb::NamespaceMode::Node as i32,
            pid: pb::NamespaceMode::Container as i32,
            ipc: pb::NamespaceMode::Node as i32,
        };
        let sandbox_config = pb::PodSandboxConfig {
            metadata: Some(pb::PodSandboxMetadata {
                name: name.into(),
                uid: format!("uid-{name}"),
                namespace: "imgd-test".into(),
                attempt: 0,
            }),
            // Host network: the sandbox has no UTS namespace of its own to name.
            log_directory: log_dir.display().to_string(),
            linux: Some(pb::LinuxPodSandboxConfig {
                cgroup_parent: String::new(),
                security_context: Some(pb::LinuxSandboxSecurityContext {
                    namespace_options: Some(node),
                    privileged: false,
                }),
            }),
            ..Default::default()
        };
        let sandbox_id = self
            .rt
            .block_on(self.runtime.run_pod_sandbox(pb::RunPodSandboxRequest {
                config: Some(sandbox_config.clone()),
                runtime_handler: String::new(),
            }))
            .context("CRI RunPodSandbox")?
            .into_inner()
            .pod_sandbox_id;
        let log_file = format!("{name}.log");
        let config = pb::ContainerConfig {
            metadata: Some(pb::ContainerMetadata {
                name: name.into(),
                attempt: 0,
            }),
            image: Some(pb::ImageSpec {
                image: image.into(),
                annotations: HashMap::new(),
            }),
            command: command.iter().map(|s| s.to_string()).collect(),
            log_path: log_file.clone(),
            linux: Some(pb::LinuxContainerConfig {
                security_context: Some(pb::LinuxContainerSecurityContext {
                    namespace_options: Some(node),
                    ..Default::default()
                }),
            }),
            ..Default::default()
        };
        let container_id = self
            .rt
            .block_on(self.runtime.create_container(pb::CreateContainerRequest {
                pod_sandbox_id: sandbox_id.clone(),
                config: Some(config),
                sandbox_config: Some(sandbox_config),
            }))
            .context("CRI CreateContainer")?
            .into_inner()
            .container_id;
        self.rt
            .block_on(self.runtime.start_container(pb::StartContainerRequest {
                container_id: container_id.clone(),
            }))
            .context("CRI StartContainer")?;
        Ok(Pod {
            sandbox_id,
            container_id,
            log_path: log_dir.join(log_file),
        })
    }

    /// The container's state (e.g. `CONTAINER_EXITED`) and exit code.
    pub fn container_state(&mut self, id: &str) -> Result<(pb::ContainerState, i32)> {
        let s = self
            .rt
            .block_on(self.runtime.container_status(pb::ContainerStatusRequest {
                container_id: id.into(),
                verbose: false,
            }))?
            .into_inner()
            .status
            .context("ContainerStatus without a status")?;
        Ok((s.state(), s.exit_code))
    }

    /// Waits until the container exits; returns its exit code.
    pub fn wait_exited(&mut self, id: &str, timeout: Duration) -> Result<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            let (state, code) = self.container_state(id)?;
            if state == pb::ContainerState::ContainerExited {
                return Ok(code);
            }
            if Instant::now() > deadline {
                bail!("container {id} still {state:?} after {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops and removes the pod's container and sandbox.
    pub fn remove_pod(&mut self, pod: &Pod) -> Result<()> {
        let rt = &self.rt;
        let _ = rt.block_on(self.runtime.stop_container(pb::StopContainerRequest {
            container_id: pod.container_id.clone(),
            timeout: 1,
        }));
        rt.block_on(self.runtime.remove_container(pb::RemoveContainerRequest {
            container_id: pod.container_id.clone(),
        }))?;
        rt.block_on(self.runtime.stop_pod_sandbox(pb::StopPodSandboxRequest {
            pod_sandbox_id: pod.sandbox_id.clone(),
        }))?;
        rt.block_on(
            self.runtime
                .remove_pod_sandbox(pb::RemovePodSandboxRequest {
                    pod_sandbox_id: pod.sandbox_id.clone(),
                }),
        )?;
        Ok(())
    }
}

/// Waits for the container's first log line; returns it.
pub fn wait_first_line(path: &Path, timeout: Duration) -> Result<String> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(line) = log_lines(path).into_iter().next() {
            return Ok(line);
        }
        if Instant::now() > deadline {
            bail!("no line in {} after {timeout:?}", path.display());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The lines a container wrote, from its CRI log file (`TIME STREAM TAG TEXT` lines).
pub fn log_lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.splitn(4, ' ').nth(3).map(str::to_string))
        .collect()
}
