//! `berth admin`: manages users, organizations, teams, tokens, source repositories and
//! packages of a running registry through its admin REST API.

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use serde_json::{json, Value};

/// Connection to the registry.
#[derive(Args, Debug)]
pub struct AdminArgs {
    /// The registry's URL.
    #[arg(long, env = "BERTH_URL", default_value = "http://127.0.0.1:5000")]
    url: String,
    /// A personal access token (a site admin's for most commands; `cluster` needs none).
    #[arg(long, env = "BERTH_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// PEM file of the certificate authorities to trust for an https:// --url (besides the
    /// system's), e.g. the one that signed the registry's self-signed certificate.
    #[arg(long, env = "BERTH_CA")]
    ca: Option<std::path::PathBuf>,
    #[command(subcommand)]
    command: AdminCommand,
}

#[derive(Subcommand, Debug)]
enum AdminCommand {
    /// Users.
    #[command(subcommand)]
    User(UserCmd),
    /// Personal access tokens.
    #[command(subcommand)]
    Token(TokenCmd),
    /// Organizations and their members.
    #[command(subcommand)]
    Org(OrgCmd),
    /// Teams of an organization.
    #[command(subcommand)]
    Team(TeamCmd),
    /// Source repositories of an organization, and their CI tokens.
    #[command(subcommand)]
    Repo(RepoCmd),
    /// Package settings: visibility, grants, inheritance.
    #[command(subcommand)]
    Package(PackageCmd),
    /// The keys that sign registry tokens.
    #[command(subcommand)]
    Keys(KeysCmd),
    /// The metadata group: form it, add and remove nodes, show its state (over gRPC).
    Cluster(crate::cluster_admin::ClusterArgs),
    /// Collects garbage now: deletes, on every storage node, the blobs unreferenced for the
    /// grace period, and notes stored blobs nothing knows of. Prints what it freed.
    Gc {
        /// Only report what a collection would free now; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Subcommand, Debug)]
enum KeysCmd {
    /// Makes every frontend sign with a new key; old keys verify until their tokens expire.
    Rotate,
    /// Lists the published token-verifying keys.
    List,
}

#[derive(Subcommand, Debug)]
enum UserCmd {
    /// Creates a user.
    Create {
        name: String,
        /// Administers the whole registry.
        #[arg(long)]
        site_admin: bool,
    },
    /// Deletes a user and its tokens.
    Delete { name: String },
    /// Lists users.
    List,
}

#[derive(Subcommand, Debug)]
enum TokenCmd {
    /// Creates a personal access token (printed once).
    Create {
        user: String,
        /// Comma-separated: read:packages, write:packages, delete:packages.
        #[arg(long, value_delimiter = ',', required = true)]
        scopes: Vec<String>,
        #[arg(long, default_value = "")]
        name: String,
        #[arg(long)]
        expires_days: Option<u64>,
    },
    /// Lists a user's tokens (never their secrets).
    List { user: String },
    /// Revokes a token by id.
    Revoke { id: String },
}

#[derive(Subcommand, Debug)]
enum OrgCmd {
    /// Creates an organization with its first owner.
    Create {
        name: String,
        #[arg(long)]
        owner: String,
    },
    /// Sets a member's role (owner, member) or removes them (none).
    Member { org: String, user: String, role: String },
}

#[derive(Subcommand, Debug)]
enum TeamCmd {
    /// Creates a team.
    Create { org: String, team: String },
    /// Adds a user to a team (or removes with --remove).
    Member {
        org: String,
        team: String,
        user: String,
        #[arg(long)]
        remove: bool,
    },
}

#[derive(Subcommand, Debug)]
enum RepoCmd {
    /// Registers (or updates) a source repository with its URL and grants.
    Set {
        org: String,
        name: String,
        #[arg(long)]
        url: String,
        /// PRINCIPAL=PERM, e.g. user:alice=admin or team:acme/devs=write (repeatable).
        #[arg(long = "grant")]
        grants: Vec<String>,
    },
    /// Issues a short-lived CI token bound to the repository (printed once).
    CiToken { org: String, name: String },
}

#[derive(Subcommand, Debug)]
enum PackageCmd {
    /// Shows a package's settings.
    Show { name: String },
    /// Changes a package's settings.
    Set {
        name: String,
        /// private, public or internal.
        #[arg(long)]
        visibility: Option<String>,
        /// Whether it inherits its source repository's grants.
        #[arg(long)]
        inherit: Option<bool>,
        /// PRINCIPAL=PERM to grant, PRINCIPAL=none to remove.
        #[arg(long)]
        grant: Option<String>,
    },
}

/// Runs one admin command and prints the answer.
pub async fn run(args: AdminArgs) -> Result<()> {
    let (method, path, body): (reqwest::Method, String, Option<Value>) = match args.command {
        AdminCommand::Cluster(c) => return crate::cluster_admin::run(c).await,
        AdminCommand::User(UserCmd::Create { name, site_admin }) => {
            (reqwest::Method::POST, "admin/users".into(), Some(json!({"name": name, "site_admin": site_admin})))
        }
        AdminCommand::User(UserCmd::Delete { name }) => (reqwest::Method::DELETE, format!("admin/users/{name}"), None),
        AdminCommand::User(UserCmd::List) => (reqwest::Method::GET, "admin/users".into(), None),
        AdminCommand::Keys(KeysCmd::Rotate) => (reqwest::Method::POST, "admin/keys/rotate".into(), None),
        AdminCommand::Keys(KeysCmd::List) => (reqwest::Method::GET, "admin/keys".into(), None),
        AdminCommand::Gc { dry_run } => {
            (if dry_run { reqwest::Method::GET } else { reqwest::Method::POST }, "admin/gc".into(), None)
        }
        AdminCommand::Token(TokenCmd::Create { user, scopes, name, expires_days }) => (
            reqwest::Method::POST,
            format!("admin/users/{user}/tokens"),
            Some(json!({"name": name, "scopes": scopes, "expires_in_days": expires_days})),
        ),
        AdminCommand::Token(TokenCmd::List { user }) => {
            (reqwest::Method::GET, format!("admin/users/{user}/tokens"), None)
        }
        AdminCommand::Token(TokenCmd::Revoke { id }) => (reqwest::Method::DELETE, format!("admin/tokens/{id}"), None),
        AdminCommand::Org(OrgCmd::Create { name, owner }) => {
            (reqwest::Method::POST, "admin/orgs".into(), Some(json!({"name": name, "owner": owner})))
        }
        AdminCommand::Org(OrgCmd::Member { org, user, role }) => match role.as_str() {
            "none" => (reqwest::Method::DELETE, format!("admin/orgs/{org}/members/{user}"), None),
            _ => (reqwest::Method::PUT, format!("admin/orgs/{org}/members/{user}"), Some(json!({"role": role}))),
        },
        AdminCommand::Team(TeamCmd::Create { org, team }) => {
            (reqwest::Method::POST, format!("admin/orgs/{org}/teams"), Some(json!({"name": team})))
        }
        AdminCommand::Team(TeamCmd::Member { org, team, user, remove }) => (
            if remove { reqwest::Method::DELETE } else { reqwest::Method::PUT },
            format!("admin/orgs/{org}/teams/{team}/members/{user}"),
            None,
        ),
        AdminCommand::Repo(RepoCmd::Set { org, name, url, grants }) => (
            reqwest::Method::PUT,
            format!("admin/orgs/{org}/repos/{name}"),
            Some(json!({"url": url, "grants": grants})),
        ),
        AdminCommand::Repo(RepoCmd::CiToken { org, name }) => {
            (reqwest::Method::POST, format!("admin/orgs/{org}/repos/{name}/ci-tokens"), None)
        }
        AdminCommand::Package(PackageCmd::Show { name }) => (reqwest::Method::GET, format!("packages/{name}"), None),
        AdminCommand::Package(PackageCmd::Set { name, visibility, inherit, grant }) => (
            reqwest::Method::PATCH,
            format!("packages/{name}"),
            Some(json!({"visibility": visibility, "inherit": inherit, "grant": grant})),
        ),
    };
    let url = format!("{}/api/{path}", args.url.trim_end_matches('/'));
    let token = args.token.context("--token (or BERTH_TOKEN) is required")?;
    let mut req = http_client(args.ca.as_deref())?.request(method, &url).basic_auth("berth-admin", Some(&token));
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.with_context(|| format!("reaching {url}"))?;
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    if !status.is_success() {
        bail!("{status}: {text}");
    }
    match serde_json::from_str::<Value>(&text) {
        Ok(v) => println!("{}", serde_json::to_string_pretty(&v)?),
        Err(_) if text.is_empty() => println!("ok"),
        Err(_) => println!("{text}"),
    }
    Ok(())
}

/// An HTTP client trusting the system's roots and the PEM certificates in `ca`.
fn http_client(ca: Option<&std::path::Path>) -> Result<reqwest::Client> {
    let mut builder = reqwest::Client::builder();
    if let Some(ca) = ca {
        let pem = std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?;
        for cert in
            reqwest::Certificate::from_pem_bundle(&pem).with_context(|| format!("certificates in {}", ca.display()))?
        {
            builder = builder.add_root_certificate(cert);
        }
    }
    Ok(builder.build()?)
}
