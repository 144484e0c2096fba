//! `soul down` as a plan: what taking a stack down removes, in an order the engine accepts,
//! run by the same executor as apply. Pure, like [`super::plan`].

use super::plan::{Observed, Plan, Reason, Step};
use crate::pod::Role;

/// Removes every container, network and (with `volumes`) named volume carrying the stack's
/// label: the pod's dependents before the pause container whose namespace they share,
/// unused duplicate networks before the networks (a name is ambiguous until they are gone),
/// networks by ID. External volumes are never the stack's to remove.
pub fn plan_down(observed: &Observed, volumes: bool) -> Plan {
    let mut containers: Vec<_> = observed.containers.iter().collect();
    containers.sort_by_key(|c| c.role == Some(Role::Pause));
    let mut steps: Vec<Step> = containers
        .into_iter()
        .map(|c| Step::RemoveContainer {
            name: c.name.clone(),
            id: c.id.clone(),
            reason: Reason::TakenDown,
        })
        .collect();
    steps.extend(observed.duplicate_networks.iter().map(|(name, id)| {
        Step::RemoveDuplicateNetwork {
            name: name.clone(),
            id: id.clone(),
        }
    }));
    steps.extend(observed.networks.iter().map(|n| observed.remove_network(n)));
    if volumes {
        steps.extend(
            observed
                .volumes
                .iter()
                .map(|name| Step::RemoveVolume { name: name.clone() }),
        );
    }
    Plan {
        steps,
        ..Plan::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reconcile::plan::ObservedContainer;

    fn container(name: &str, role: Role) -> ObservedContainer {
        ObservedContainer {
            id: format!("id-{name}"),
            name: name.into(),
            sidecar: Some("web".into()),
            role: Some(role),
            config_hash: None,
            owner: None,
            running: true,
            state: "running".into(),
            health: None,
            image: "nginx:1".into(),
            image_id: "sha256:1".into(),
        }
    }

    #[test]
    fn down_removes_dependents_before_the_pause_container_then_networks_by_id_and_volumes_only_when_asked()
     {
        let mut o = Observed {
            containers: vec![
                container("p", Role::Pause),
                container("a", Role::App),
                container("g", Role::Gate),
            ],
            ..Observed::default()
        };
        o.networks.insert("soul_s".into());
        o.network_ids.insert("soul_s".into(), "net-id".into());
        o.duplicate_networks = vec![("soul_s".into(), "dup-id".into())];
        o.volumes.insert("soul_s_data".into());
        let names = |p: &Plan| -> Vec<String> { p.steps.iter().map(|s| s.to_string()).collect() };
        let kept = plan_down(&o, false);
        assert_eq!(
            names(&kept),
            [
                "remove container a (the stack is taken down)",
                "remove container g (the stack is taken down)",
                "remove container p (the stack is taken down)",
                "remove network dup-id, an unused duplicate of soul_s",
                "remove network soul_s",
            ]
        );
        assert!(matches!(
            &kept.steps[4],
            Step::RemoveNetwork { id: Some(id), .. } if id == "net-id"
        ));
        let all = plan_down(&o, true);
        assert_eq!(
            names(&all).last().map(String::as_str),
            Some("remove volume soul_s_data (its data is gone)")
        );
        assert!(plan_down(&Observed::default(), true).is_empty());
    }
}
