"""Knowledge amalgamation (Shen et al., ICCV 2019): many expert teachers, one student, no labels."""
