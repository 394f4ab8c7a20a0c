//! Who may do what: identities, packages and the permission rules of GitHub's registry model.
//!
//! The rules are one pure function, [`permission`], over the facts the metadata service
//! gathers for a request ([`AccessFacts`]), so they can be tested exhaustively without a server.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A personal access token's scope.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Scope {
    /// `read:packages`: pull.
    #[serde(rename = "read:packages")]
    ReadPackages,
    /// `write:packages`: push (implies read).
    #[serde(rename = "write:packages")]
    WritePackages,
    /// `delete:packages`: delete manifests, tags and blobs.
    #[serde(rename = "delete:packages")]
    DeletePackages,
}

impl FromStr for Scope {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "read:packages" => Ok(Scope::ReadPackages),
            "write:packages" => Ok(Scope::WritePackages),
            "delete:packages" => Ok(Scope::DeletePackages),
            other => Err(format!("unknown scope {other:?}")),
        }
    }
}

/// A level of access to a package; each includes the ones below it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Perm {
    /// Pull.
    Read,
    /// Pull and push.
    Write,
    /// Everything, deletion and settings included.
    Admin,
}

impl FromStr for Perm {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "read" => Ok(Perm::Read),
            "write" => Ok(Perm::Write),
            "admin" => Ok(Perm::Admin),
            other => Err(format!("unknown permission {other:?}")),
        }
    }
}

/// Who can see a package.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Visibility {
    /// Only those granted access (the default on first push).
    #[default]
    Private,
    /// Anyone may pull, anonymously too.
    Public,
    /// Members of the owning organization may pull.
    Internal,
}

impl FromStr for Visibility {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "private" => Ok(Visibility::Private),
            "public" => Ok(Visibility::Public),
            "internal" => Ok(Visibility::Internal),
            other => Err(format!("unknown visibility {other:?}")),
        }
    }
}

/// A grantee: a user (`user:NAME`) or a team (`team:ORG/TEAM`); serialized in that string
/// form, so that grants are JSON objects.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Principal {
    /// A user.
    User(String),
    /// A team of an organization.
    Team {
        /// Organization.
        org: String,
        /// Team.
        team: String,
    },
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Principal::User(u) => write!(f, "user:{u}"),
            Principal::Team { org, team } => write!(f, "team:{org}/{team}"),
        }
    }
}

impl FromStr for Principal {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(u) = s.strip_prefix("user:") {
            return Ok(Principal::User(u.to_string()));
        }
        if let Some(t) = s.strip_prefix("team:") {
            if let Some((org, team)) = t.split_once('/') {
                return Ok(Principal::Team { org: org.into(), team: team.into() });
            }
        }
        Err(format!("a grantee is user:NAME or team:ORG/TEAM, not {s:?}"))
    }
}

impl Serialize for Principal {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Principal {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

/// Grants of a package or a source repository.
pub type Grants = BTreeMap<Principal, Perm>;

/// A package: one repository of its owner.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Package {
    /// Repository name.
    pub name: String,
    /// Visibility.
    pub visibility: Visibility,
    /// Direct grants.
    pub grants: Grants,
    /// Linked source repository (`ORG/REPO`), whose grants it inherits.
    pub source: Option<String>,
    /// Whether it inherits the linked source repository's grants.
    pub inherit: bool,
    /// When it was created (ms since the epoch).
    pub created_ms: u64,
    /// When it was deleted (ms since the epoch, the metadata leader's clock), if it is:
    /// hidden from listings and pulls, restorable for the retention period.
    #[serde(default)]
    pub deleted_ms: Option<u64>,
    /// What its latest push said of it: `org.opencontainers.image.description` (at most
    /// [`MAX_DESCRIPTION`] characters), `.licenses` (at most [`MAX_LICENSE`]) and `.source`,
    /// from the manifest's (or index's) annotations or the image config's labels.
    #[serde(default)]
    pub about: About,
}

/// Longest package description kept, in characters (GHCR's limit); longer ones are cut.
pub const MAX_DESCRIPTION: usize = 512;
/// Longest license expression kept, in characters; longer ones are cut.
pub const MAX_LICENSE: usize = 256;

/// A package's description, license and source, as its pushes label them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct About {
    /// `org.opencontainers.image.description`.
    pub description: Option<String>,
    /// `org.opencontainers.image.licenses`.
    pub license: Option<String>,
    /// `org.opencontainers.image.source`.
    pub source_url: Option<String>,
}

/// A source repository registered by an organization.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceRepo {
    /// Organization.
    pub org: String,
    /// Name inside the organization.
    pub name: String,
    /// Its URL, as packages name it in `org.opencontainers.image.source`.
    pub url: String,
    /// Grants it passes to linked packages.
    pub grants: Grants,
}

/// A member's role in an organization.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OrgRole {
    /// Administers the organization and all its packages.
    Owner,
    /// A member.
    Member,
}

/// Who is asking.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Identity {
    /// No credentials.
    Anonymous,
    /// A user through a personal access token with these scopes.
    User {
        /// User name.
        name: String,
        /// The token's scopes.
        scopes: BTreeSet<Scope>,
        /// Whether the user administers the whole registry.
        site_admin: bool,
    },
    /// A CI token bound to a source repository.
    Ci {
        /// The source repository, `ORG/REPO`.
        source: String,
    },
}

impl Identity {
    /// Whether the credentials carry `scope` (`write:packages` implies `read:packages`); only
    /// personal access tokens have scopes.
    pub fn has_scope(&self, scope: Scope) -> bool {
        match self {
            Identity::User { scopes, .. } => {
                scopes.contains(&scope) || (scope == Scope::ReadPackages && scopes.contains(&Scope::WritePackages))
            }
            _ => false,
        }
    }

    /// The name put in a token's `sub`.
    pub fn subject(&self) -> String {
        match self {
            Identity::Anonymous => String::new(),
            Identity::User { name, .. } => name.clone(),
            Identity::Ci { source } => format!("ci:{source}"),
        }
    }
}

/// What the metadata service knows that bears on one identity and one repository.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessFacts {
    /// The owner (first name segment) is an organization.
    pub owner_is_org: bool,
    /// The asking user's role in the owning organization.
    pub org_role: Option<OrgRole>,
    /// Teams of the owning organization the asking user is in.
    pub teams: BTreeSet<String>,
    /// The package, if it exists.
    pub package: Option<Package>,
    /// The source repository the package is linked to, if any.
    pub source: Option<SourceRepo>,
}

/// An action on a repository, as Docker token scopes name them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Read manifests and blobs, list tags.
    Pull,
    /// Upload and tag.
    Push,
    /// Delete manifests, tags, blobs.
    Delete,
}

impl Action {
    /// The name in a scope string.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Pull => "pull",
            Action::Push => "push",
            Action::Delete => "delete",
        }
    }
}

/// The owner of a repository: its first name segment.
pub fn owner_of(repo: &str) -> &str {
    repo.split('/').next().unwrap_or(repo)
}

fn grant_for(grants: &Grants, user: &str, org: &str, teams: &BTreeSet<String>) -> Option<Perm> {
    grants
        .iter()
        .filter(|(p, _)| match p {
            Principal::User(u) => u == user,
            Principal::Team { org: o, team } => o == org && teams.contains(team),
        })
        .map(|(_, perm)| *perm)
        .max()
}

/// The permission `who` has on `repo`, before token scopes are applied.
pub fn permission(who: &Identity, repo: &str, facts: &AccessFacts) -> Option<Perm> {
    // A deleted package's visibility and grants are gone with it: what is left is what its
    // namespace gives (its administrators may restore it; who may create packages there may
    // push a new one in its place).
    if facts.package.as_ref().is_some_and(|p| p.deleted_ms.is_some()) {
        let without = AccessFacts { package: None, ..facts.clone() };
        return permission(who, repo, &without);
    }
    let owner = owner_of(repo);
    let public = facts.package.as_ref().map(|p| p.visibility);
    let by_visibility = match public {
        Some(Visibility::Public) => Some(Perm::Read),
        Some(Visibility::Internal) if facts.org_role.is_some() => Some(Perm::Read),
        _ => None,
    };
    let own = match who {
        Identity::Anonymous => None,
        Identity::User { site_admin: true, .. } => Some(Perm::Admin),
        Identity::User { name, .. } => {
            let namespace = if !facts.owner_is_org && name == owner {
                Some(Perm::Admin)
            } else {
                match facts.org_role {
                    Some(OrgRole::Owner) => Some(Perm::Admin),
                    // Members may create packages in their organization; once it exists,
                    // access comes from grants.
                    Some(OrgRole::Member) if facts.package.is_none() => Some(Perm::Write),
                    _ => None,
                }
            };
            let direct = facts.package.as_ref().and_then(|p| grant_for(&p.grants, name, owner, &facts.teams));
            let inherited = match (&facts.package, &facts.source) {
                (Some(p), Some(s)) if p.inherit => grant_for(&s.grants, name, owner, &facts.teams),
                _ => None,
            };
            namespace.max(direct).max(inherited)
        }
        Identity::Ci { source } => {
            let source_org = owner_of(source);
            match &facts.package {
                None if source_org == owner => Some(Perm::Write),
                Some(p) if p.source.as_deref() == Some(source.as_str()) => Some(Perm::Write),
                Some(Package { visibility: Visibility::Internal, .. }) if source_org == owner => Some(Perm::Read),
                _ => None,
            }
        }
    };
    own.max(by_visibility)
}

/// The actions `who` may take on `repo`: its permission, cut down by its token's scopes.
pub fn allowed_actions(who: &Identity, repo: &str, facts: &AccessFacts) -> BTreeSet<Action> {
    let mut out = BTreeSet::new();
    let Some(perm) = permission(who, repo, facts) else { return out };
    let (read, write, delete) = match who {
        // A site administrator's token is cut down by its scopes like anyone's.
        Identity::User { .. } => (
            who.has_scope(Scope::ReadPackages),
            who.has_scope(Scope::WritePackages),
            who.has_scope(Scope::DeletePackages),
        ),
        // CI tokens push and pull; they never delete.
        Identity::Ci { .. } => (true, true, false),
        // Anonymous reads only what is public, which the visibility rule decided.
        Identity::Anonymous => (true, false, false),
    };
    if read {
        out.insert(Action::Pull);
    }
    if write && perm >= Perm::Write {
        out.insert(Action::Push);
    }
    if delete && perm >= Perm::Admin {
        out.insert(Action::Delete);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(name: &str, scopes: &[Scope]) -> Identity {
        Identity::User { name: name.into(), scopes: scopes.iter().copied().collect(), site_admin: false }
    }

    fn pkg(vis: Visibility) -> Package {
        Package {
            name: "acme/app".into(),
            visibility: vis,
            grants: Grants::new(),
            source: None,
            inherit: true,
            created_ms: 0,
            deleted_ms: None,
            about: Default::default(),
        }
    }

    const ALL: [Scope; 3] = [Scope::ReadPackages, Scope::WritePackages, Scope::DeletePackages];

    #[test]
    fn user_namespace_and_scopes() {
        let facts = AccessFacts { package: Some(pkg(Visibility::Private)), ..Default::default() };
        let all: BTreeSet<_> = [Action::Pull, Action::Push, Action::Delete].into();
        assert_eq!(allowed_actions(&user("alice", &ALL), "alice/app", &facts), all);
        assert_eq!(allowed_actions(&user("alice", &[Scope::ReadPackages]), "alice/app", &facts), [Action::Pull].into());
        assert!(allowed_actions(&user("bob", &ALL), "alice/app", &facts).is_empty());
        assert!(allowed_actions(&Identity::Anonymous, "alice/app", &facts).is_empty());
    }

    #[test]
    fn visibility() {
        let public = AccessFacts { owner_is_org: true, package: Some(pkg(Visibility::Public)), ..Default::default() };
        assert_eq!(allowed_actions(&Identity::Anonymous, "acme/app", &public), [Action::Pull].into());
        let internal =
            AccessFacts { owner_is_org: true, package: Some(pkg(Visibility::Internal)), ..Default::default() };
        assert!(allowed_actions(&user("out", &ALL), "acme/app", &internal).is_empty());
        let member = AccessFacts { org_role: Some(OrgRole::Member), ..internal };
        assert_eq!(allowed_actions(&user("m", &ALL), "acme/app", &member), [Action::Pull].into());
    }

    #[test]
    fn teams_and_inheritance() {
        let mut p = pkg(Visibility::Private);
        p.grants.insert(Principal::Team { org: "acme".into(), team: "devs".into() }, Perm::Write);
        p.source = Some("acme/repo".into());
        let source = SourceRepo {
            org: "acme".into(),
            name: "repo".into(),
            url: "https://git.example/acme/repo".into(),
            grants: [(Principal::User("carol".into()), Perm::Admin)].into(),
        };
        let facts = AccessFacts {
            owner_is_org: true,
            org_role: Some(OrgRole::Member),
            teams: ["devs".to_string()].into(),
            package: Some(p.clone()),
            source: Some(source.clone()),
        };
        assert_eq!(permission(&user("dave", &ALL), "acme/app", &facts), Some(Perm::Write));
        let carol = AccessFacts { teams: BTreeSet::new(), ..facts.clone() };
        assert_eq!(permission(&user("carol", &ALL), "acme/app", &carol), Some(Perm::Admin));
        p.inherit = false;
        let no_inherit = AccessFacts { package: Some(p), ..carol };
        assert_eq!(permission(&user("carol", &ALL), "acme/app", &no_inherit), None);
    }

    #[test]
    fn ci_tokens() {
        let ci = Identity::Ci { source: "acme/repo".into() };
        let new = AccessFacts { owner_is_org: true, ..Default::default() };
        assert_eq!(allowed_actions(&ci, "acme/new", &new), [Action::Pull, Action::Push].into());
        assert!(allowed_actions(&ci, "other/new", &AccessFacts::default()).is_empty());
        let mut p = pkg(Visibility::Private);
        let unlinked = AccessFacts { owner_is_org: true, package: Some(p.clone()), ..Default::default() };
        assert!(allowed_actions(&ci, "acme/app", &unlinked).is_empty());
        p.source = Some("acme/repo".into());
        let linked = AccessFacts { owner_is_org: true, package: Some(p), ..Default::default() };
        assert_eq!(allowed_actions(&ci, "acme/app", &linked), [Action::Pull, Action::Push].into());
    }

    #[test]
    fn site_admin_tokens_are_cut_down_by_their_scopes() {
        let admin = |scopes: &[Scope]| Identity::User {
            name: "root".into(),
            scopes: scopes.iter().copied().collect(),
            site_admin: true,
        };
        let facts = AccessFacts { owner_is_org: true, package: Some(pkg(Visibility::Private)), ..Default::default() };
        assert_eq!(allowed_actions(&admin(&[Scope::ReadPackages]), "acme/app", &facts), [Action::Pull].into());
        assert_eq!(
            allowed_actions(&admin(&[Scope::WritePackages]), "acme/app", &facts),
            [Action::Pull, Action::Push].into()
        );
        assert_eq!(
            allowed_actions(&admin(&ALL), "acme/app", &facts),
            [Action::Pull, Action::Push, Action::Delete].into()
        );
    }

    #[test]
    fn org_owner_administers_everything_of_the_org() {
        let facts = AccessFacts {
            owner_is_org: true,
            org_role: Some(OrgRole::Owner),
            package: Some(pkg(Visibility::Private)),
            ..Default::default()
        };
        assert_eq!(permission(&user("o", &ALL), "acme/app", &facts), Some(Perm::Admin));
        let member = AccessFacts { org_role: Some(OrgRole::Member), ..facts };
        assert_eq!(permission(&user("m", &ALL), "acme/app", &member), None);
    }
}
