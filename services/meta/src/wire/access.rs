//! The permission model on the wire: enums, grantees and grants, packages, source
//! repositories, identities and the access facts gathered for one request.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use berth_core::access::{
    About, AccessFacts, Grants, Identity, OrgRole, Package, Perm, Principal, Scope, SourceRepo, Visibility,
};
use berth_proto::meta as pb;

use super::{from_all, from_opt, required, to_all, Wire, WireError};

/// An enum that travels as its proto enum's number; the zero value (`*_UNSPECIFIED`) and
/// numbers the proto does not define are refused.
macro_rules! wire_enum {
    ($rust:ident as $proto:ident { $($variant:ident => $wire:ident),+ $(,)? }) => {
        impl Wire for $rust {
            type Proto = i32;

            fn to_proto(self) -> i32 {
                match self {
                    $($rust::$variant => pb::$proto::$wire as i32,)+
                }
            }

            fn from_proto(value: i32) -> Result<$rust, WireError> {
                match pb::$proto::try_from(value) {
                    $(Ok(pb::$proto::$wire) => Ok($rust::$variant),)+
                    _ => Err(WireError::Enum { what: stringify!($rust), value }),
                }
            }
        }
    };
}

wire_enum!(Perm as Perm { Read => Read, Write => Write, Admin => Admin });
wire_enum!(Visibility as Visibility { Private => Private, Public => Public, Internal => Internal });
wire_enum!(OrgRole as OrgRole { Owner => Owner, Member => Member });
wire_enum!(Scope as Scope {
    ReadPackages => ReadPackages,
    WritePackages => WritePackages,
    DeletePackages => DeletePackages,
});

/// A grantee travels in its string form, `user:NAME` or `team:ORG/TEAM`.
impl Wire for Principal {
    type Proto = String;

    fn to_proto(self) -> String {
        self.to_string()
    }

    fn from_proto(s: String) -> Result<Principal, WireError> {
        s.parse().map_err(WireError::Principal)
    }
}

impl Wire for Grants {
    type Proto = HashMap<String, i32>;

    fn to_proto(self) -> HashMap<String, i32> {
        self.into_iter().map(|(who, perm)| (who.to_proto(), perm.to_proto())).collect()
    }

    fn from_proto(m: HashMap<String, i32>) -> Result<Grants, WireError> {
        m.into_iter().map(|(who, perm)| Ok((Principal::from_proto(who)?, Perm::from_proto(perm)?))).collect()
    }
}

/// An organization's members and their roles.
impl Wire for BTreeMap<String, OrgRole> {
    type Proto = pb::OrgMembers;

    fn to_proto(self) -> pb::OrgMembers {
        pb::OrgMembers { roles: self.into_iter().map(|(user, role)| (user, role.to_proto())).collect() }
    }

    fn from_proto(p: pb::OrgMembers) -> Result<BTreeMap<String, OrgRole>, WireError> {
        p.roles.into_iter().map(|(user, role)| Ok((user, OrgRole::from_proto(role)?))).collect()
    }
}

impl Wire for Package {
    type Proto = pb::Package;

    fn to_proto(self) -> pb::Package {
        let Package { name, visibility, grants, source, inherit, created_ms, deleted_ms, about } = self;
        pb::Package {
            name,
            visibility: visibility.to_proto(),
            grants: grants.to_proto(),
            source,
            inherit,
            created_ms,
            deleted_ms,
            about: Some(about.to_proto()),
        }
    }

    fn from_proto(p: pb::Package) -> Result<Package, WireError> {
        let pb::Package { name, visibility, grants, source, inherit, created_ms, deleted_ms, about } = p;
        Ok(Package {
            name,
            visibility: Visibility::from_proto(visibility)?,
            grants: Grants::from_proto(grants)?,
            source,
            inherit,
            created_ms,
            deleted_ms,
            about: About::from_proto(about.unwrap_or_default())?,
        })
    }
}

/// A package's description; a message without one reads as empty.
impl Wire for About {
    type Proto = pb::About;

    fn to_proto(self) -> pb::About {
        let About { description, license, source_url } = self;
        pb::About { description, license, source_url }
    }

    fn from_proto(p: pb::About) -> Result<About, WireError> {
        let pb::About { description, license, source_url } = p;
        Ok(About { description, license, source_url })
    }
}

impl Wire for SourceRepo {
    type Proto = pb::SourceRepo;

    fn to_proto(self) -> pb::SourceRepo {
        let SourceRepo { org, name, url, grants } = self;
        pb::SourceRepo { org, name, url, grants: grants.to_proto() }
    }

    fn from_proto(p: pb::SourceRepo) -> Result<SourceRepo, WireError> {
        let pb::SourceRepo { org, name, url, grants } = p;
        Ok(SourceRepo { org, name, url, grants: Grants::from_proto(grants)? })
    }
}

impl Wire for Identity {
    type Proto = pb::Identity;

    fn to_proto(self) -> pb::Identity {
        use pb::identity::{self as id, Who};
        let who = match self {
            Identity::Anonymous => Who::Anonymous(id::Anonymous {}),
            Identity::User { name, scopes, site_admin } => {
                Who::User(id::User { name, scopes: to_all(scopes), site_admin })
            }
            Identity::Ci { source } => Who::Ci(id::Ci { source }),
        };
        pb::Identity { who: Some(who) }
    }

    fn from_proto(p: pb::Identity) -> Result<Identity, WireError> {
        use pb::identity::Who;
        Ok(match required(p.who, "Identity.who")? {
            Who::Anonymous(_) => Identity::Anonymous,
            Who::User(u) => Identity::User {
                name: u.name,
                scopes: from_all::<Scope, BTreeSet<_>>(u.scopes)?,
                site_admin: u.site_admin,
            },
            Who::Ci(c) => Identity::Ci { source: c.source },
        })
    }
}

impl Wire for AccessFacts {
    type Proto = pb::AccessFacts;

    fn to_proto(self) -> pb::AccessFacts {
        let AccessFacts { owner_is_org, org_role, teams, package, source } = self;
        pb::AccessFacts {
            owner_is_org,
            org_role: org_role.map(OrgRole::to_proto),
            teams: teams.into_iter().collect(),
            package: package.map(Package::to_proto),
            source: source.map(SourceRepo::to_proto),
        }
    }

    fn from_proto(p: pb::AccessFacts) -> Result<AccessFacts, WireError> {
        let pb::AccessFacts { owner_is_org, org_role, teams, package, source } = p;
        Ok(AccessFacts {
            owner_is_org,
            org_role: from_opt(org_role)?,
            teams: teams.into_iter().collect(),
            package: from_opt(package)?,
            source: from_opt(source)?,
        })
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::super::records::tests::round_trips;
    use super::*;

    fn grants() -> Grants {
        [
            (Principal::User("alice".into()), Perm::Read),
            (Principal::User("bob".into()), Perm::Write),
            (Principal::Team { org: "acme".into(), team: "devs".into() }, Perm::Admin),
        ]
        .into()
    }

    /// Access facts from the sparsest to the fullest.
    pub fn facts() -> Vec<AccessFacts> {
        let package = Package {
            name: "acme/app".into(),
            visibility: Visibility::Internal,
            grants: grants(),
            source: Some("acme/repo".into()),
            inherit: true,
            created_ms: 11,
            deleted_ms: Some(12),
            about: About {
                description: Some("a <b>thing</b>".into()),
                license: Some("MIT OR Apache-2.0".into()),
                source_url: None,
            },
        };
        let source = SourceRepo {
            org: "acme".into(),
            name: "repo".into(),
            url: "https://git.example/acme/repo".into(),
            grants: grants(),
        };
        vec![
            AccessFacts::default(),
            AccessFacts {
                owner_is_org: true,
                org_role: Some(OrgRole::Member),
                teams: ["devs".to_string(), "ops".to_string()].into(),
                package: Some(package),
                source: Some(source),
            },
        ]
    }

    /// Every kind of identity.
    pub fn identities() -> Vec<Identity> {
        vec![
            Identity::Anonymous,
            Identity::User { name: "alice".into(), scopes: BTreeSet::new(), site_admin: false },
            Identity::User {
                name: "root".into(),
                scopes: [Scope::ReadPackages, Scope::WritePackages, Scope::DeletePackages].into(),
                site_admin: true,
            },
            Identity::Ci { source: "acme/repo".into() },
        ]
    }

    #[test]
    fn enums_round_trip_and_zero_is_refused() {
        [Perm::Read, Perm::Write, Perm::Admin].into_iter().for_each(round_trips);
        [Visibility::Private, Visibility::Public, Visibility::Internal].into_iter().for_each(round_trips);
        [OrgRole::Owner, OrgRole::Member].into_iter().for_each(round_trips);
        [Scope::ReadPackages, Scope::WritePackages, Scope::DeletePackages].into_iter().for_each(round_trips);
        assert_eq!(Perm::from_proto(0), Err(WireError::Enum { what: "Perm", value: 0 }));
        assert_eq!(Visibility::from_proto(9), Err(WireError::Enum { what: "Visibility", value: 9 }));
        assert_eq!(OrgRole::from_proto(-1), Err(WireError::Enum { what: "OrgRole", value: -1 }));
        assert_eq!(Scope::from_proto(0), Err(WireError::Enum { what: "Scope", value: 0 }));
    }

    #[test]
    fn access_types_round_trip() {
        round_trips(Principal::User("alice".into()));
        round_trips(Principal::Team { org: "acme".into(), team: "devs".into() });
        round_trips(grants());
        round_trips(Grants::new());
        round_trips(BTreeMap::from([("alice".to_string(), OrgRole::Owner), ("bob".into(), OrgRole::Member)]));
        round_trips(BTreeMap::<String, OrgRole>::new());
        facts().into_iter().for_each(round_trips);
        identities().into_iter().for_each(round_trips);
    }

    #[test]
    fn malformed_access_types_are_refused() {
        assert!(matches!(Principal::from_proto("alice".into()), Err(WireError::Principal(_))));
        let bad_grant = HashMap::from([("org:x".to_string(), pb::Perm::Read as i32)]);
        assert!(matches!(Grants::from_proto(bad_grant), Err(WireError::Principal(_))));
        let unset_perm = HashMap::from([("user:a".to_string(), pb::Perm::Unspecified as i32)]);
        assert_eq!(Grants::from_proto(unset_perm), Err(WireError::Enum { what: "Perm", value: 0 }));
        assert_eq!(Identity::from_proto(pb::Identity { who: None }), Err(WireError::Missing("Identity.who")));
        let mut f = facts()[1].clone().to_proto();
        if let Some(p) = f.package.as_mut() {
            p.visibility = pb::Visibility::Unspecified as i32;
        }
        assert_eq!(AccessFacts::from_proto(f), Err(WireError::Enum { what: "Visibility", value: 0 }));
    }
}
