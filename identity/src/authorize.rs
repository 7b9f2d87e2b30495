//! Who may have which identity: the signer's rules, after istiod's for ztunnel. An agent proves
//! who it is with its projected service-account token (TokenReview), and may have the
//! identities of the service accounts that pods on its own node run as, and no others.

use k8s_openapi::api::{
    authentication::v1::{TokenReview, TokenReviewSpec},
    core::v1::Pod,
};
use kube::{
    api::{ListParams, PostParams},
    Api, Client,
};

use crate::spiffe::Identity;

/// The bound token's claims that name the pod (and node) it was issued to.
const POD_NAME: &str = "authentication.kubernetes.io/pod-name";
const POD_UID: &str = "authentication.kubernetes.io/pod-uid";
const NODE_NAME: &str = "authentication.kubernetes.io/node-name";

/// An authenticated agent: the pod its token was issued to, and that pod's node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Agent {
    pub pod: String,
    pub node: String,
}

#[derive(Debug, thiserror::Error)]
pub enum Denied {
    #[error("the token was not accepted{}", .0.as_deref().map(|e| format!(": {e}")).unwrap_or_default())]
    Unauthenticated(Option<String>),
    #[error("{0} is not the agent's service account")]
    NotTheAgent(String),
    #[error("the token names no pod (a projected service-account token does)")]
    NoPod,
    #[error("the token's pod {0} is gone, or is another pod of that name")]
    PodGone(String),
    #[error("the token's pod {pod} runs on {pod_node}, and the token was issued on {token_node}")]
    NodeMismatch {
        pod: String,
        pod_node: String,
        token_node: String,
    },
    #[error("{0} is not of this signer's trust domain")]
    ForeignTrustDomain(Identity),
    #[error("no pod on node {node} runs as {identity}")]
    NotOnNode { node: String, identity: Identity },
    #[error("the API server: {0}")]
    Api(#[from] kube::Error),
}

impl Denied {
    /// The HTTP status the signer answers with.
    pub fn status(&self) -> u16 {
        match self {
            Denied::Unauthenticated(_) => 401,
            Denied::Api(_) => 503,
            _ => 403,
        }
    }
}

pub struct Authorizer {
    client: Client,
    trust_domain: String,
    /// `<namespace>/<name>` of the agents' service account.
    agent_namespace: String,
    agent_service_account: String,
    /// The audience the agents' tokens are projected for: the signer accepts no other token
    /// (an API server token stolen elsewhere), and the API server does not accept these.
    audience: String,
}

impl Authorizer {
    pub fn new(
        client: Client,
        trust_domain: &str,
        agent_namespace: &str,
        agent_service_account: &str,
        audience: &str,
    ) -> Self {
        Authorizer {
            client,
            trust_domain: trust_domain.to_owned(),
            agent_namespace: agent_namespace.to_owned(),
            agent_service_account: agent_service_account.to_owned(),
            audience: audience.to_owned(),
        }
    }

    /// The agent `token` was issued to, by TokenReview, and then by its pod, which must still
    /// exist with the token's UID and service account.
    pub async fn authenticate(&self, token: &str) -> Result<Agent, Denied> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: Some(vec![self.audience.clone()]),
            },
            ..Default::default()
        };
        let reviewed = Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await?;
        let status = reviewed.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            return Err(Denied::Unauthenticated(status.error));
        }
        let user = status.user.unwrap_or_default();
        let username = user.username.unwrap_or_default();
        let agent = format!(
            "system:serviceaccount:{}:{}",
            self.agent_namespace, self.agent_service_account
        );
        if username != agent {
            return Err(Denied::NotTheAgent(username));
        }
        let extra = user.extra.unwrap_or_default();
        let claim = |key: &str| extra.get(key).and_then(|values| values.first()).cloned();
        let (Some(pod_name), Some(pod_uid)) = (claim(POD_NAME), claim(POD_UID)) else {
            return Err(Denied::NoPod);
        };
        let pod = Api::<Pod>::namespaced(self.client.clone(), &self.agent_namespace)
            .get_opt(&pod_name)
            .await?
            .filter(|pod| {
                pod.metadata.uid.as_deref() == Some(pod_uid.as_str())
                    && pod
                        .spec
                        .as_ref()
                        .and_then(|s| s.service_account_name.as_deref())
                        == Some(self.agent_service_account.as_str())
            })
            .ok_or_else(|| Denied::PodGone(pod_name.clone()))?;
        let node = pod
            .spec
            .and_then(|spec| spec.node_name)
            .ok_or_else(|| Denied::PodGone(pod_name.clone()))?;
        // Tokens from Kubernetes 1.30 on name the node as well; where they do, it must agree.
        if let Some(token_node) = claim(NODE_NAME) {
            if token_node != node {
                return Err(Denied::NodeMismatch {
                    pod: pod_name,
                    pod_node: node,
                    token_node,
                });
            }
        }
        Ok(Agent {
            pod: pod_name,
            node,
        })
    }

    /// Whether `agent` may have `identity`: a pod on its node, not finished, runs as that
    /// service account.
    pub async fn authorize(&self, agent: &Agent, identity: &Identity) -> Result<(), Denied> {
        if identity.trust_domain != self.trust_domain {
            return Err(Denied::ForeignTrustDomain(identity.clone()));
        }
        let pods = Api::<Pod>::namespaced(self.client.clone(), &identity.namespace)
            .list(&ListParams::default().fields(&format!("spec.nodeName={}", agent.node)))
            .await?;
        let runs_as = |pod: &Pod| {
            let account = pod
                .spec
                .as_ref()
                .and_then(|s| s.service_account_name.as_deref())
                .unwrap_or("default");
            let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
            account == identity.service_account
                && pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(&agent.node)
                && !matches!(phase, Some("Succeeded" | "Failed"))
        };
        if pods.items.iter().any(runs_as) {
            Ok(())
        } else {
            Err(Denied::NotOnNode {
                node: agent.node.clone(),
                identity: identity.clone(),
            })
        }
    }
}
