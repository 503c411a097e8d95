"""The contract's SQLite schema; copied verbatim from the marker down (`make sync`)."""

# --- shared: contract schema (the same in every script: edit shared_blocks/contract_schema.py, then `make sync`) ------
# The contract's tables (the worker's D1 schema), created in a new database.
SCHEMA = """
CREATE TABLE IF NOT EXISTS scenarios (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  context TEXT NOT NULL,
  person_state JSON TEXT NOT NULL,
  facts JSON TEXT,
  critical_info JSON TEXT,
  difficulty_level INTEGER DEFAULT 1,
  harm_type TEXT,
  expected_response TEXT,
  created_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP
);
CREATE TABLE IF NOT EXISTS experiences (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  scenario_id INTEGER NOT NULL,
  ai_response TEXT NOT NULL,
  predicted_harm REAL,
  actual_harm REAL NOT NULL,
  harm_breakdown JSON TEXT NOT NULL,
  learned_lesson TEXT,
  buddhist_scores JSON TEXT,
  buddhist_alignment TEXT,
  model_version INTEGER DEFAULT 1,
  timestamp TIMESTAMP DEFAULT CURRENT_TIMESTAMP,
  FOREIGN KEY (scenario_id) REFERENCES scenarios(id)
);
CREATE TABLE IF NOT EXISTS causal_patterns (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  pattern_name TEXT NOT NULL,
  pattern_type TEXT,
  confidence REAL,
  example_count INTEGER DEFAULT 0,
  example_ids JSON TEXT,
  description TEXT,
  updated_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP
);
CREATE TABLE IF NOT EXISTS model_versions (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  version_number INTEGER NOT NULL,
  episodes_trained INTEGER,
  avg_harm_last_100 REAL,
  notes TEXT,
  created_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP
);
CREATE INDEX IF NOT EXISTS idx_experiences_scenario ON experiences(scenario_id);
CREATE INDEX IF NOT EXISTS idx_experiences_timestamp ON experiences(timestamp);
CREATE INDEX IF NOT EXISTS idx_scenarios_difficulty ON scenarios(difficulty_level);
"""
# --- end shared: contract schema --------------------------------------------------------------------------------------
