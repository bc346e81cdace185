-- Per-user forwarding switches; NULL follows the server-wide setting.
ALTER TABLE users ADD COLUMN tcp_forwarding INTEGER;
ALTER TABLE users ADD COLUMN agent_forwarding INTEGER;
ALTER TABLE users ADD COLUMN x11_forwarding INTEGER;
