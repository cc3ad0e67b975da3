//! Org tool registrations and org secrets on SQLite (tables of migration
//! `0004_tools_and_secrets.sql`).
//!
//! Tools are versioned per org and name exactly like pipelines: the manifest is stored as its
//! canonical JSON text, the digest is the SHA-256 of that text, and the next version is chosen
//! inside a `BEGIN IMMEDIATE` transaction on the writer connection, so two saves of one name
//! never pick the same version. Secrets are single conditional statements on the writer
//! connection; reads use the read pool.
//!
//! The store never sees a secret's clear value: only the sealed bytes the caller passes.

use arches_core::ids::{OrgId, SecretName, ToolName};
use arches_core::ports::{StoreError, StoreResult};
use arches_core::time::Timestamp;
use arches_core::tooldef::{StoredSecret, StoredTool};
use serde_json::Value;
use sha2::{Digest, Sha256};
use sqlx::sqlite::SqliteRow;
use sqlx::Connection;

use super::rows::{column, to_u32};
use super::{canonical, cpu_work, SqliteStore, BEGIN_WRITE};
use crate::decode::{parse_text, secret_name_text};
use crate::error::db;

const TOOL_COLUMNS: &str = "org_id, name, version, digest, manifest, created_at";

const SECRET_COLUMNS: &str =
    "org_id, name, version, key_id, nonce, ciphertext, created_at, updated_at";

/// A `tools` row.
fn tool_from_row(row: &SqliteRow) -> StoreResult<StoredTool> {
    let manifest: &str = column(row, "manifest")?;
    Ok(StoredTool {
        org_id: parse_text(column::<&str>(row, "org_id")?, "tools.org_id")?,
        name: column(row, "name")?,
        version: to_u32(column(row, "version")?, "tools.version")?,
        digest: column(row, "digest")?,
        manifest: serde_json::from_str(manifest)
            .map_err(|e| StoreError::Corrupt(format!("tools.manifest holds invalid json: {e}")))?,
        created_at: Timestamp(column(row, "created_at")?),
    })
}

/// A `secrets` row.
fn secret_from_row(row: &SqliteRow) -> StoreResult<StoredSecret> {
    Ok(StoredSecret {
        org_id: parse_text(column::<&str>(row, "org_id")?, "secrets.org_id")?,
        name: secret_name_text(column(row, "name")?, "secrets.name")?,
        version: to_u32(column(row, "version")?, "secrets.version")?,
        key_id: column(row, "key_id")?,
        nonce: column(row, "nonce")?,
        ciphertext: column(row, "ciphertext")?,
        created_at: Timestamp(column(row, "created_at")?),
        updated_at: Timestamp(column(row, "updated_at")?),
    })
}

impl SqliteStore {
    pub(crate) async fn save_tool_impl(
        &self,
        org: OrgId,
        name: &ToolName,
        manifest: &Value,
    ) -> StoreResult<StoredTool> {
        let value = canonical(manifest.clone());
        let text = value.to_string();
        let digest = hex::encode(Sha256::digest(text.as_bytes()));
        let name = name.as_str();
        let org_text = org.to_string();

        let mut writer = self.writer().await?;
        let mut tx = writer
            .connection
            .begin_with(BEGIN_WRITE)
            .await
            .map_err(db)?;
        let existing: Option<(i64, i64)> = sqlx::query_as(
            "SELECT version, created_at FROM tools
             WHERE org_id = ?1 AND name = ?2 AND digest = ?3",
        )
        .bind(&org_text)
        .bind(name)
        .bind(&digest)
        .fetch_optional(&mut *tx)
        .await
        .map_err(db)?;
        let (version, created_at) = match existing {
            Some(found) => found,
            None => {
                let created_at = self.clock.now().as_micros();
                let version: i64 = sqlx::query_scalar(
                    "INSERT INTO tools (org_id, name, version, digest, manifest, created_at)
                     SELECT ?1, ?2, COALESCE(MAX(version), 0) + 1, ?3, ?4, ?5
                     FROM tools WHERE org_id = ?1 AND name = ?2
                     RETURNING version",
                )
                .bind(&org_text)
                .bind(name)
                .bind(&digest)
                .bind(&text)
                .bind(created_at)
                .fetch_one(&mut *tx)
                .await
                .map_err(db)?;
                (version, created_at)
            }
        };
        tx.commit().await.map_err(db)?;
        Ok(StoredTool {
            org_id: org,
            name: name.to_owned(),
            version: to_u32(version, "tools.version")?,
            digest,
            manifest: value,
            created_at: Timestamp(created_at),
        })
    }

    pub(crate) async fn tool_impl(
        &self,
        org: OrgId,
        name: &str,
        version: Option<u32>,
    ) -> StoreResult<Option<StoredTool>> {
        let query = match version {
            Some(_) => format!(
                "SELECT {TOOL_COLUMNS} FROM tools WHERE org_id = ?1 AND name = ?2 AND version = ?3"
            ),
            None => format!(
                "SELECT {TOOL_COLUMNS} FROM tools WHERE org_id = ?1 AND name = ?2
                 ORDER BY version DESC LIMIT 1"
            ),
        };
        let mut query = sqlx::query(&query).bind(org.to_string()).bind(name);
        if let Some(version) = version {
            query = query.bind(i64::from(version));
        }
        let row = query.fetch_optional(&self.reader).await.map_err(db)?;
        row.as_ref().map(tool_from_row).transpose()
    }

    pub(crate) async fn tools_impl(&self, org: OrgId) -> StoreResult<Vec<StoredTool>> {
        let rows = sqlx::query(&format!(
            "SELECT {TOOL_COLUMNS} FROM tools AS t WHERE org_id = ?1
               AND version = (SELECT MAX(version) FROM tools
                              WHERE org_id = t.org_id AND name = t.name)
             ORDER BY name"
        ))
        .bind(org.to_string())
        .fetch_all(&self.reader)
        .await
        .map_err(db)?;
        cpu_work(rows.len(), || rows.iter().map(tool_from_row).collect())
    }

    pub(crate) async fn tool_versions_impl(
        &self,
        org: OrgId,
        name: &str,
    ) -> StoreResult<Vec<StoredTool>> {
        let rows = sqlx::query(&format!(
            "SELECT {TOOL_COLUMNS} FROM tools WHERE org_id = ?1 AND name = ?2
             ORDER BY version DESC"
        ))
        .bind(org.to_string())
        .bind(name)
        .fetch_all(&self.reader)
        .await
        .map_err(db)?;
        cpu_work(rows.len(), || rows.iter().map(tool_from_row).collect())
    }

    pub(crate) async fn put_secret_impl(
        &self,
        org: OrgId,
        name: &SecretName,
        key_id: &str,
        nonce: &[u8],
        ciphertext: &[u8],
    ) -> StoreResult<StoredSecret> {
        let now = self.clock.now().as_micros();
        let mut writer = self.writer().await?;
        // One statement: a new name starts at version 1, an existing one keeps its creation
        // time and takes the next version.
        let (version, created_at, updated_at): (i64, i64, i64) = sqlx::query_as(
            "INSERT INTO secrets (org_id, name, version, key_id, nonce, ciphertext, created_at,
                                  updated_at)
             VALUES (?1, ?2, 1, ?3, ?4, ?5, ?6, ?6)
             ON CONFLICT (org_id, name) DO UPDATE SET
                 version = secrets.version + 1,
                 key_id = excluded.key_id,
                 nonce = excluded.nonce,
                 ciphertext = excluded.ciphertext,
                 updated_at = excluded.updated_at
             RETURNING version, created_at, updated_at",
        )
        .bind(org.to_string())
        .bind(name.as_str())
        .bind(key_id)
        .bind(nonce)
        .bind(ciphertext)
        .bind(now)
        .fetch_one(&mut writer.connection)
        .await
        .map_err(db)?;
        Ok(StoredSecret {
            org_id: org,
            name: name.clone(),
            version: to_u32(version, "secrets.version")?,
            key_id: key_id.to_owned(),
            nonce: nonce.to_vec(),
            ciphertext: ciphertext.to_vec(),
            created_at: Timestamp(created_at),
            updated_at: Timestamp(updated_at),
        })
    }

    pub(crate) async fn secret_impl(
        &self,
        org: OrgId,
        name: &str,
    ) -> StoreResult<Option<StoredSecret>> {
        let row = sqlx::query(&format!(
            "SELECT {SECRET_COLUMNS} FROM secrets WHERE org_id = ?1 AND name = ?2"
        ))
        .bind(org.to_string())
        .bind(name)
        .fetch_optional(&self.reader)
        .await
        .map_err(db)?;
        row.as_ref().map(secret_from_row).transpose()
    }

    pub(crate) async fn secrets_impl(&self, org: Option<OrgId>) -> StoreResult<Vec<StoredSecret>> {
        let rows = match org {
            Some(org) => {
                sqlx::query(&format!(
                    "SELECT {SECRET_COLUMNS} FROM secrets WHERE org_id = ?1 ORDER BY name"
                ))
                .bind(org.to_string())
                .fetch_all(&self.reader)
                .await
            }
            None => {
                sqlx::query(&format!(
                    "SELECT {SECRET_COLUMNS} FROM secrets ORDER BY org_id, name"
                ))
                .fetch_all(&self.reader)
                .await
            }
        }
        .map_err(db)?;
        cpu_work(rows.len(), || rows.iter().map(secret_from_row).collect())
    }

    pub(crate) async fn reseal_secret_impl(&self, secret: &StoredSecret) -> StoreResult<bool> {
        let mut writer = self.writer().await?;
        let done = sqlx::query(
            "UPDATE secrets SET key_id = ?4, nonce = ?5, ciphertext = ?6
             WHERE org_id = ?1 AND name = ?2 AND version = ?3 AND updated_at = ?7",
        )
        .bind(secret.org_id.to_string())
        .bind(secret.name.as_str())
        .bind(i64::from(secret.version))
        .bind(&secret.key_id)
        .bind(&secret.nonce)
        .bind(&secret.ciphertext)
        .bind(secret.updated_at.as_micros())
        .execute(&mut writer.connection)
        .await
        .map_err(db)?;
        Ok(done.rows_affected() == 1)
    }

    pub(crate) async fn delete_secret_impl(&self, org: OrgId, name: &str) -> StoreResult<bool> {
        let mut writer = self.writer().await?;
        let done = sqlx::query("DELETE FROM secrets WHERE org_id = ?1 AND name = ?2")
            .bind(org.to_string())
            .bind(name)
            .execute(&mut writer.connection)
            .await
            .map_err(db)?;
        Ok(done.rows_affected() == 1)
    }
}
