//! The annotations and labels that select what the webhook injects, which the intentions
//! reconciler also reads (to find pods that should be meshed but are not) and the
//! sidecar's agent checks again (the same grammar of file names and paths).

/// Set by the API server on every namespace to its own name; tenants cannot change it, so
/// an excluded namespace is recognised by it and not only by the request's namespace.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// The mesh sidecar.
pub mod mesh {
    /// The namespace label that meshes every pod of the namespace, with the value
    /// [`LABEL_ENABLED`] (fail-closed: its webhook's failurePolicy is Fail).
    pub const LABEL: &str = "capstan.dev/mesh";
    pub const LABEL_ENABLED: &str = "enabled";
    /// A pod's opt-in (`"true"`, in a namespace that is not labelled) or opt-out
    /// (`"false"`, in any namespace).
    pub const INJECT: &str = "capstan.dev/inject";
    /// The version that injected the pod; informative only (the marker of an injected pod
    /// is its proxy container, since a tenant can set an annotation by hand).
    pub const INJECTED: &str = "capstan.dev/injected";
    /// `service[.namespace]:local-port`, comma separated: the app dials the proxy itself,
    /// and its outbound traffic is not redirected.
    pub const UPSTREAMS: &str = "capstan.dev/upstreams";
    /// The port the proxy forwards inbound connections to (default: the first app
    /// container's first port).
    pub const APP_PORT: &str = "capstan.dev/app-port";
}

/// The secrets agent.
pub mod agent {
    pub const INJECT: &str = "capstan.dev/agent-inject";
    /// The engine's Kubernetes auth role the agent logs in with.
    pub const ROLE: &str = "capstan.dev/agent-role";
    /// Followed by the file name; the value is the engine path of the secret.
    pub const SECRET_PREFIX: &str = "capstan.dev/agent-inject-secret-";
    /// Followed by the file name; the value is the template the file is rendered with.
    pub const TEMPLATE_PREFIX: &str = "capstan.dev/agent-inject-template-";
    pub const INIT_ONLY: &str = "capstan.dev/agent-init-only";
    pub const RUN_AS_USER: &str = "capstan.dev/agent-run-as-user";
    /// The version that injected the agent; informative only, like the mesh's.
    pub const INJECTED: &str = "capstan.dev/agent-injected";
    /// What every agent annotation begins with: an unknown one is refused, since a typo
    /// would otherwise silently leave a file out.
    pub const FAMILY: &str = "capstan.dev/agent-";
    /// The finalizer the webhook puts on every pod it gives the agent: the credentials
    /// reconciler removes it once the engine has revoked the pod's logins and leases
    /// (RELIABILITY N2), so a pod evicted or killed before its agent's own cleanup
    /// does not disappear with its credentials still live.
    pub const REVOKE_FINALIZER: &str = "secrets.capstan.dev/revoke-credentials";
    /// The label (value [`AGENT_LABEL_VALUE`]) on the same pods: the reconciler watches
    /// only them, by label selector, not every pod of the cluster.
    pub const AGENT_LABEL: &str = "secrets.capstan.dev/agent";
    pub const AGENT_LABEL_VALUE: &str = "injected";
}
