-- The example application's table: the seed article's user:{id}:profile.
CREATE TABLE IF NOT EXISTS users (
    id integer PRIMARY KEY,
    name text NOT NULL,
    email text UNIQUE,
    karma integer NOT NULL DEFAULT 0 CHECK (karma >= 0),
    updated_at timestamptz NOT NULL DEFAULT now()
);

INSERT INTO users (id, name, email) VALUES
    (1, 'Ada Lovelace', 'ada@example.com'),
    (2, 'Alan Turing', 'alan@example.com'),
    (3, 'Grace Hopper', 'grace@example.com')
ON CONFLICT (id) DO NOTHING;
