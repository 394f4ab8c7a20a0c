//! Directory changes (accounts, organizations, tokens, keys, package settings) on the wire:
//! one oneof case per variant of [`DirectoryChange`].

use berth_core::access::{About, OrgRole, Perm, Principal, SourceRepo, Visibility};
use berth_core::store::{DirectoryChange, PublicSigningKey, PullCount, TokenRecord, User};
use berth_proto::meta as pb;
use pb::directory_change::{self as dc, Change};

use super::{from_opt, required, Wire, WireError};

impl Wire for DirectoryChange {
    type Proto = pb::DirectoryChange;

    fn to_proto(self) -> pb::DirectoryChange {
        let change = match self {
            DirectoryChange::InitSigningKey { key } => Change::InitSigningKey(dc::InitSigningKey { key }),
            DirectoryChange::DropLegacySigningKey => Change::DropLegacySigningKey(dc::DropLegacySigningKey {}),
            DirectoryChange::PublishKey { key, retire_after_ms, now_ms } => {
                Change::PublishKey(dc::PublishKey { key: Some(key.to_proto()), retire_after_ms, now_ms })
            }
            DirectoryChange::RotateKeys => Change::RotateKeys(dc::RotateKeys {}),
            DirectoryChange::CreateUser(user) => Change::CreateUser(user.to_proto()),
            DirectoryChange::DeleteUser(name) => Change::DeleteUser(name),
            DirectoryChange::CreateToken(token) => Change::CreateToken(token.to_proto()),
            DirectoryChange::RevokeToken(id) => Change::RevokeToken(id),
            DirectoryChange::TouchToken { id, now_ms } => Change::TouchToken(dc::TouchToken { id, now_ms }),
            DirectoryChange::CreateOrg { name, owner } => Change::CreateOrg(dc::CreateOrg { name, owner }),
            DirectoryChange::SetOrgMember { org, user, role } => {
                Change::SetOrgMember(dc::SetOrgMember { org, user, role: role.map(OrgRole::to_proto) })
            }
            DirectoryChange::CreateTeam { org, team } => Change::CreateTeam(dc::CreateTeam { org, team }),
            DirectoryChange::SetTeamMember { org, team, user, member } => {
                Change::SetTeamMember(dc::SetTeamMember { org, team, user, member })
            }
            DirectoryChange::PutSourceRepo(source) => Change::PutSourceRepo(source.to_proto()),
            DirectoryChange::EnsurePackage { repo, source, creator, now_ms } => {
                Change::EnsurePackage(dc::EnsurePackage { repo, source, creator, now_ms })
            }
            DirectoryChange::LinkSourceByUrl { repo, url } => {
                Change::LinkSourceByUrl(dc::LinkSourceByUrl { repo, url })
            }
            DirectoryChange::UpdatePackage { repo, visibility, grant, inherit } => {
                Change::UpdatePackage(dc::UpdatePackage {
                    repo,
                    visibility: visibility.map(Visibility::to_proto),
                    grant: grant.map(|(principal, perm)| dc::GrantChange {
                        principal: principal.to_proto(),
                        perm: perm.map(Perm::to_proto),
                    }),
                    inherit,
                })
            }
            DirectoryChange::DeleteVersion { repo, digest, now_ms } => {
                Change::DeleteVersion(dc::DeleteVersion { repo, digest, now_ms })
            }
            DirectoryChange::RestoreVersion { repo, digest, window_ms, now_ms } => {
                Change::RestoreVersion(dc::RestoreVersion { repo, digest, window_ms, now_ms })
            }
            DirectoryChange::DeletePackage { repo, now_ms } => {
                Change::DeletePackage(dc::DeletePackage { repo, now_ms })
            }
            DirectoryChange::RestorePackage { repo, window_ms, now_ms } => {
                Change::RestorePackage(dc::RestorePackage { repo, window_ms, now_ms })
            }
            DirectoryChange::DescribePackage { repo, about } => {
                Change::DescribePackage(dc::DescribePackage { repo, about: Some(about.to_proto()) })
            }
            DirectoryChange::CountPulls(counts) => Change::CountPulls(dc::CountPulls {
                counts: counts
                    .into_iter()
                    .map(|PullCount { repo, digest, pulls }| dc::PullCount { repo, digest, pulls })
                    .collect(),
            }),
        };
        pb::DirectoryChange { change: Some(change) }
    }

    fn from_proto(p: pb::DirectoryChange) -> Result<DirectoryChange, WireError> {
        Ok(match required(p.change, "DirectoryChange.change")? {
            Change::InitSigningKey(dc::InitSigningKey { key }) => DirectoryChange::InitSigningKey { key },
            Change::DropLegacySigningKey(dc::DropLegacySigningKey {}) => DirectoryChange::DropLegacySigningKey,
            Change::PublishKey(dc::PublishKey { key, retire_after_ms, now_ms }) => DirectoryChange::PublishKey {
                key: PublicSigningKey::from_proto(required(key, "PublishKey.key")?)?,
                retire_after_ms,
                now_ms,
            },
            Change::RotateKeys(dc::RotateKeys {}) => DirectoryChange::RotateKeys,
            Change::CreateUser(user) => DirectoryChange::CreateUser(User::from_proto(user)?),
            Change::DeleteUser(name) => DirectoryChange::DeleteUser(name),
            Change::CreateToken(token) => DirectoryChange::CreateToken(TokenRecord::from_proto(token)?),
            Change::RevokeToken(id) => DirectoryChange::RevokeToken(id),
            Change::TouchToken(dc::TouchToken { id, now_ms }) => DirectoryChange::TouchToken { id, now_ms },
            Change::CreateOrg(dc::CreateOrg { name, owner }) => DirectoryChange::CreateOrg { name, owner },
            Change::SetOrgMember(dc::SetOrgMember { org, user, role }) => {
                DirectoryChange::SetOrgMember { org, user, role: from_opt(role)? }
            }
            Change::CreateTeam(dc::CreateTeam { org, team }) => DirectoryChange::CreateTeam { org, team },
            Change::SetTeamMember(dc::SetTeamMember { org, team, user, member }) => {
                DirectoryChange::SetTeamMember { org, team, user, member }
            }
            Change::PutSourceRepo(source) => DirectoryChange::PutSourceRepo(SourceRepo::from_proto(source)?),
            Change::EnsurePackage(dc::EnsurePackage { repo, source, creator, now_ms }) => {
                DirectoryChange::EnsurePackage { repo, source, creator, now_ms }
            }
            Change::LinkSourceByUrl(dc::LinkSourceByUrl { repo, url }) => {
                DirectoryChange::LinkSourceByUrl { repo, url }
            }
            Change::UpdatePackage(dc::UpdatePackage { repo, visibility, grant, inherit }) => {
                DirectoryChange::UpdatePackage {
                    repo,
                    visibility: from_opt(visibility)?,
                    grant: grant
                        .map(|g| Ok::<_, WireError>((Principal::from_proto(g.principal)?, from_opt::<Perm>(g.perm)?)))
                        .transpose()?,
                    inherit,
                }
            }
            Change::DeleteVersion(dc::DeleteVersion { repo, digest, now_ms }) => {
                DirectoryChange::DeleteVersion { repo, digest, now_ms }
            }
            Change::RestoreVersion(dc::RestoreVersion { repo, digest, window_ms, now_ms }) => {
                DirectoryChange::RestoreVersion { repo, digest, window_ms, now_ms }
            }
            Change::DeletePackage(dc::DeletePackage { repo, now_ms }) => {
                DirectoryChange::DeletePackage { repo, now_ms }
            }
            Change::RestorePackage(dc::RestorePackage { repo, window_ms, now_ms }) => {
                DirectoryChange::RestorePackage { repo, window_ms, now_ms }
            }
            Change::DescribePackage(dc::DescribePackage { repo, about }) => {
                DirectoryChange::DescribePackage { repo, about: About::from_proto(about.unwrap_or_default())? }
            }
            Change::CountPulls(dc::CountPulls { counts }) => DirectoryChange::CountPulls(
                counts
                    .into_iter()
                    .map(|dc::PullCount { repo, digest, pulls }| PullCount { repo, digest, pulls })
                    .collect(),
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::access::tests::facts;
    use super::super::records::tests::{keys, round_trips, tokens};
    use super::*;

    /// Every variant, optional fields both set and unset.
    fn changes() -> Vec<DirectoryChange> {
        let source = facts().into_iter().find_map(|f| f.source);
        let mut all = vec![
            DirectoryChange::InitSigningKey { key: "00ff".into() },
            DirectoryChange::DropLegacySigningKey,
            DirectoryChange::RotateKeys,
            DirectoryChange::CreateUser(User { name: "alice".into(), site_admin: true, created_ms: 2 }),
            DirectoryChange::DeleteUser("alice".into()),
            DirectoryChange::RevokeToken("tok1".into()),
            DirectoryChange::TouchToken { id: "tok1".into(), now_ms: 77 },
            DirectoryChange::CreateOrg { name: "acme".into(), owner: "alice".into() },
            DirectoryChange::SetOrgMember { org: "acme".into(), user: "bob".into(), role: Some(OrgRole::Owner) },
            DirectoryChange::SetOrgMember { org: "acme".into(), user: "bob".into(), role: None },
            DirectoryChange::CreateTeam { org: "acme".into(), team: "devs".into() },
            DirectoryChange::SetTeamMember {
                org: "acme".into(),
                team: "devs".into(),
                user: "bob".into(),
                member: true,
            },
            DirectoryChange::SetTeamMember {
                org: "acme".into(),
                team: "devs".into(),
                user: "bob".into(),
                member: false,
            },
            DirectoryChange::EnsurePackage {
                repo: "acme/app".into(),
                source: Some("acme/repo".into()),
                creator: Some("bob".into()),
                now_ms: 1,
            },
            DirectoryChange::EnsurePackage { repo: "bob/app".into(), source: None, creator: None, now_ms: 0 },
            DirectoryChange::LinkSourceByUrl { repo: "acme/app".into(), url: "https://git.example/acme/repo".into() },
            DirectoryChange::UpdatePackage {
                repo: "acme/app".into(),
                visibility: Some(Visibility::Public),
                grant: Some((Principal::Team { org: "acme".into(), team: "devs".into() }, Some(Perm::Write))),
                inherit: Some(false),
            },
            DirectoryChange::UpdatePackage {
                repo: "acme/app".into(),
                visibility: None,
                grant: Some((Principal::User("bob".into()), None)),
                inherit: None,
            },
            DirectoryChange::UpdatePackage { repo: "acme/app".into(), visibility: None, grant: None, inherit: None },
            DirectoryChange::DeleteVersion { repo: "acme/app".into(), digest: "sha256:00".into(), now_ms: 5 },
            DirectoryChange::RestoreVersion {
                repo: "acme/app".into(),
                digest: "sha256:00".into(),
                window_ms: 6,
                now_ms: 7,
            },
            DirectoryChange::DeletePackage { repo: "acme/app".into(), now_ms: 8 },
            DirectoryChange::RestorePackage { repo: "acme/app".into(), window_ms: 9, now_ms: 10 },
            DirectoryChange::CountPulls(vec![]),
            DirectoryChange::DescribePackage { repo: "acme/app".into(), about: About::default() },
            DirectoryChange::DescribePackage {
                repo: "acme/app".into(),
                about: About {
                    description: Some("d".into()),
                    license: Some("MIT".into()),
                    source_url: Some("https://git.example/acme/repo".into()),
                },
            },
            DirectoryChange::CountPulls(vec![
                PullCount { repo: "acme/app".into(), digest: "sha256:00".into(), pulls: 3 },
                PullCount { repo: "acme/b".into(), digest: "sha256:01".into(), pulls: 1 },
            ]),
        ];
        all.extend(keys().into_iter().map(|key| DirectoryChange::PublishKey { key, retire_after_ms: 9, now_ms: 8 }));
        all.extend(tokens().into_iter().map(DirectoryChange::CreateToken));
        all.extend(source.map(DirectoryChange::PutSourceRepo));
        all
    }

    #[test]
    fn every_directory_change_round_trips() {
        let all = changes();
        assert_eq!(all.len(), 32);
        all.into_iter().for_each(round_trips);
    }

    #[test]
    fn malformed_changes_are_refused() {
        let missing = pb::DirectoryChange { change: None };
        assert_eq!(DirectoryChange::from_proto(missing), Err(WireError::Missing("DirectoryChange.change")));
        let keyless = pb::DirectoryChange {
            change: Some(Change::PublishKey(dc::PublishKey { key: None, retire_after_ms: 1, now_ms: 1 })),
        };
        assert_eq!(DirectoryChange::from_proto(keyless), Err(WireError::Missing("PublishKey.key")));
        let bad_grant = pb::DirectoryChange {
            change: Some(Change::UpdatePackage(dc::UpdatePackage {
                repo: "a/b".into(),
                visibility: None,
                grant: Some(dc::GrantChange { principal: "user:bob".into(), perm: Some(0) }),
                inherit: None,
            })),
        };
        assert_eq!(DirectoryChange::from_proto(bad_grant), Err(WireError::Enum { what: "Perm", value: 0 }));
    }
}
